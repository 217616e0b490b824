"""Image geometry: the :class:`Volume` container and the permute/flip :class:`Reorientation`.

Coordinate conventions (the single source of truth; ``docs/conventions.md`` repeats them with a table)
-----------------------------------------------------------------------------------------------------

* **Physical space is LPS** (x -> patient Left, y -> Posterior, z -> Superior), as in ITK, SimpleITK and
  DICOM.  3D Slicer works in **RAS**; ``RAS = diag(-1, -1, 1) @ LPS`` (x and y change sign, z does not).
* **IJK vs array order.** ITK indices are ``(i, j, k)`` = (column, row, slice) and ``spacing``,
  ``origin`` and ``direction`` are given in that order.  numpy arrays of volumes are indexed
  ``array[k, j, i]`` (shape ``(K, J, I)``), the order of ``SimpleITK.GetArrayFromImage``.
* **Index coordinates** put voxel *centres* on integers: voxel ``(i, j, k)`` covers
  ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5] x [k - 0.5, k + 0.5]`` and its centre is at
  ``ijk_to_lps @ (i, j, k, 1)`` where ``ijk_to_lps = [[D @ diag(spacing), origin], [0, 0, 0, 1]]``
  and ``D`` is the 3x3 direction matrix whose *columns* are the unit vectors of the i, j, k axes in LPS
  (ITK's direction tuple reshaped row-major).
* **Canonical orientation** is the input volume with its axes permuted and flipped (never resampled) so
  that its direction is as close as possible to the identity: i -> Left, j -> Posterior, k -> Superior.
  A canonical axial slice ``array[k]`` is shown in radiological convention (anterior on the top row,
  patient right on the image left).  For an oblique volume each axis goes to its dominant LPS axis and
  the canonical direction keeps the true (near-identity) cosines.  The engine segments canonical axial
  slices; :class:`Reorientation` maps arrays and indices back to the input.
* **In-plane continuous pixel coordinates** (x = column, y = row of a canonical slice) are *edge*
  coordinates: pixel ``p`` spans ``[p, p + 1)`` and its centre is ``p + 0.5``; so index coordinate
  ``i`` equals edge coordinate ``x - 0.5``.  Normalised coordinates for ``torch`` ``affine_grid`` /
  ``grid_sample`` use ``align_corners=False``: ``x_n = 2 x / W - 1`` (``-1`` and ``+1`` are the outer
  pixel edges).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 matrix that converts homogeneous LPS points to RAS (it is its own inverse)."""


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine ``matrix`` to ``points`` of shape ``(N, 3)`` (or ``(3,)``); returns the same shape."""
    pts = np.asarray(points, dtype=np.float64)
    single = pts.ndim == 1
    pts = np.atleast_2d(pts)
    out = pts @ matrix[:3, :3].T + matrix[:3, 3]
    return out[0] if single else out


@dataclass
class Volume:
    """A 3-D scalar image and its physical geometry.

    Attributes:
        array: ``(K, J, I)`` voxel values (array order ``[k, j, i]``), any scalar dtype.
        spacing: voxel size in mm along i, j, k.
        origin: LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
        direction: ``(3, 3)`` matrix whose columns are the unit vectors of the i, j, k axes in LPS.
    """

    array: np.ndarray
    spacing: tuple
    origin: tuple
    direction: np.ndarray

    def __post_init__(self) -> None:
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = np.array(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin need three values (i, j, k order)")
        if getattr(self.array, "ndim", None) != 3:
            raise ValueError(f"Volume.array must be 3-D (K, J, I), got shape {np.shape(self.array)}")

    # --- geometry -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        """Array shape ``(K, J, I)``."""
        return tuple(self.array.shape)

    @property
    def size_ijk(self) -> tuple:
        """Number of voxels along i, j, k (ITK ``GetSize()`` order)."""
        return tuple(self.array.shape[::-1])

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from index coordinates ``(i, j, k, 1)`` (voxel centres integer) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from index coordinates to RAS mm (Slicer's ``IJKToRAS`` of the same image)."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    def lps_to_ijk(self) -> np.ndarray:
        """Inverse of :meth:`ijk_to_lps`."""
        return np.linalg.inv(self.ijk_to_lps())

    def ras_to_ijk(self) -> np.ndarray:
        """Inverse of :meth:`ijk_to_ras`."""
        return np.linalg.inv(self.ijk_to_ras())

    def same_geometry(self, other: "Volume", tol: float = 1e-5) -> bool:
        """True when ``other`` has the same shape, spacing, origin and direction (within ``tol``)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new :class:`Volume` with this geometry and ``array`` (same ``(K, J, I)`` shape; not copied)."""
        if tuple(np.shape(array)) != self.shape:
            raise ValueError(f"array shape {np.shape(array)} differs from the volume shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    # --- SimpleITK ------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: Any) -> "Volume":
        """Build a Volume from a 3-D scalar ``SimpleITK.Image`` (the voxels are copied once)."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        )

    def to_sitk(self, array: np.ndarray | None = None) -> Any:
        """A ``SimpleITK.Image`` of ``array`` (default: this volume's array) with this geometry.

        SimpleITK copies the voxels; ``array`` must have shape ``(K, J, I)``.
        """
        import SimpleITK as sitk

        arr = self.array if array is None else array
        if tuple(np.shape(arr)) != self.shape:
            raise ValueError(f"array shape {np.shape(arr)} differs from the volume shape {self.shape}")
        image = sitk.GetImageFromArray(np.asarray(arr), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image


class Reorientation:
    """Permutation + flips that take an input volume to canonical orientation, and back.

    ``perm[a]`` is the input axis (0 = i, 1 = j, 2 = k) that becomes canonical axis ``a``; ``flip[a]``
    tells whether it is reversed.  With input size ``n = size_ijk`` the index map is::

        input_index[perm[a]] = n[perm[a]] - 1 - canonical_index[a]   if flip[a]
                               canonical_index[a]                    otherwise

    which is exact for continuous index coordinates (voxel centres on integers).  Arrays are mapped
    with ``transpose`` and negative-stride slicing only: results are *views* of their argument (no
    copy, possibly non-contiguous; call ``np.ascontiguousarray`` where a kernel needs it).
    """

    def __init__(self, perm: Sequence[int], flip: Sequence[bool], input_shape: Sequence[int]):
        self.perm = tuple(int(p) for p in perm)
        self.flip = tuple(bool(f) for f in flip)
        if sorted(self.perm) != [0, 1, 2] or len(self.flip) != 3:
            raise ValueError(f"invalid reorientation perm={perm} flip={flip}")
        self.input_shape = tuple(int(s) for s in input_shape)  # (K, J, I)
        if len(self.input_shape) != 3:
            raise ValueError("input_shape must be (K, J, I)")

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_direction(cls, direction: np.ndarray, input_shape: Sequence[int]) -> "Reorientation":
        """The reorientation for an image of ``direction`` (columns = i, j, k axes in LPS) and
        array shape ``input_shape`` = ``(K, J, I)``; needs no voxel data (the Slicer module uses it).

        Each input axis is assigned to an LPS axis so that the sum of ``|cosines|`` is maximal (for
        axis-aligned images: the axis it points along; for oblique ones: the dominant one, ties broken
        consistently), then flipped where it points to R, A or I.
        """
        d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[a, p[a]]) for a in range(3)))
        flip = tuple(bool(d[a, best[a]] < 0) for a in range(3))
        return cls(best, flip, input_shape)

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def canonical_shape(self) -> tuple:
        """Array shape ``(K, J, I)`` of the canonical volume."""
        n = self.input_shape[::-1]  # input size in (i, j, k)
        size_c = [n[self.perm[a]] for a in range(3)]
        return tuple(size_c[::-1])

    def canonical_to_input_ijk_matrix(self) -> np.ndarray:
        """4x4 affine from canonical index coordinates ``(i, j, k, 1)`` to input index coordinates."""
        n = self.input_shape[::-1]
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for a in range(3):
            src = self.perm[a]
            if self.flip[a]:
                m[src, a] = -1.0
                m[src, 3] = n[src] - 1
            else:
                m[src, a] = 1.0
        return m

    def input_to_canonical_ijk_matrix(self) -> np.ndarray:
        """Inverse of :meth:`canonical_to_input_ijk_matrix`."""
        return np.linalg.inv(self.canonical_to_input_ijk_matrix())

    # --- points ---------------------------------------------------------------------------------
    def canonical_ijk_to_input_ijk(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` canonical index coordinates (order i, j, k; voxel centres integer) to input
        index coordinates.  Accepts a single ``(3,)`` point too."""
        return apply_affine(self.canonical_to_input_ijk_matrix(), points)

    def input_ijk_to_canonical_ijk(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`canonical_ijk_to_input_ijk`."""
        return apply_affine(self.input_to_canonical_ijk_matrix(), points)

    # --- arrays ---------------------------------------------------------------------------------
    def _canonical_axes(self) -> list:
        # canonical numpy axis m holds canonical ijk axis 2 - m, which comes from input ijk axis
        # perm[2 - m], i.e. input numpy axis 2 - perm[2 - m].
        return [2 - self.perm[2 - m] for m in range(3)]

    def to_canonical_array(self, array: np.ndarray) -> np.ndarray:
        """View of an input-order array ``(K, J, I, ...)`` in canonical order (any dtype; trailing
        axes, e.g. channels, pass through)."""
        if tuple(array.shape[:3]) != self.input_shape:
            raise ValueError(f"array shape {array.shape[:3]} differs from the input shape {self.input_shape}")
        axes = self._canonical_axes() + list(range(3, array.ndim))
        out = np.transpose(array, axes)
        index = tuple(slice(None, None, -1) if self.flip[2 - m] else slice(None) for m in range(3))
        return out[index]

    def to_input_array(self, array: np.ndarray) -> np.ndarray:
        """View of a canonical-order array ``(K, J, I, ...)`` in the input array order."""
        if tuple(array.shape[:3]) != self.canonical_shape:
            raise ValueError(
                f"array shape {array.shape[:3]} differs from the canonical shape {self.canonical_shape}"
            )
        index = tuple(slice(None, None, -1) if self.flip[2 - m] else slice(None) for m in range(3))
        unflipped = array[index]
        inverse = list(np.argsort(self._canonical_axes())) + list(range(3, array.ndim))
        return np.transpose(unflipped, inverse)

    # --- geometry -------------------------------------------------------------------------------
    def canonical_geometry(self, volume: Volume) -> tuple:
        """``(spacing, origin, direction)`` of the canonical version of ``volume``."""
        spacing_c = tuple(volume.spacing[self.perm[a]] for a in range(3))
        direction_c = np.empty((3, 3))
        for a in range(3):
            direction_c[:, a] = volume.direction[:, self.perm[a]] * (-1.0 if self.flip[a] else 1.0)
        corner_input = self.canonical_ijk_to_input_ijk(np.zeros(3))
        origin_c = tuple(apply_affine(volume.ijk_to_lps(), corner_input))
        return spacing_c, origin_c, direction_c

    def to_dict(self) -> dict:
        """JSON-friendly description (for passing between processes)."""
        return {"perm": list(self.perm), "flip": list(self.flip), "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "Reorientation":
        return cls(d["perm"], d["flip"], d["input_shape"])

    def __repr__(self) -> str:
        return f"Reorientation(perm={self.perm}, flip={self.flip}, input_shape={self.input_shape})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Reorientation)
            and self.perm == other.perm
            and self.flip == other.flip
            and self.input_shape == other.input_shape
        )


def to_canonical(volume: Volume) -> tuple:
    """Return ``(canonical_volume, reorientation)``.

    ``canonical_volume.array`` is a view of ``volume.array`` (no copy, possibly non-contiguous) and
    its geometry describes the same physical voxels: voxel centres keep their LPS positions.
    """
    reo = Reorientation.from_direction(volume.direction, volume.shape)
    spacing_c, origin_c, direction_c = reo.canonical_geometry(volume)
    return Volume(reo.to_canonical_array(volume.array), spacing_c, origin_c, direction_c), reo
