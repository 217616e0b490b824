"""LSNet in the browser: the module's workflow as a trame-slicer web app (``lsnet web``).

One logic, two front ends: the MRML side of this app is the Slicer module's own code
(``LSNetSegmentationLib.results`` puts the segmentation with terminology, the heatmap volume and its
display and the RoI markups into the scene; ``roi_table`` is the RoI list; ``process`` runs the engine
in a child process; ``geometry_bridge`` converts boxes and geometry).  This package owns only what is
specific to the web:

* ``paths``     -- the data root: every file the page names is resolved and checked to stay inside it
                   (plain Python, no Slicer);
* ``shims``     -- the few Qt-side pieces of Slicer that slicer-core lacks and ``LSNetSegmentationLib``
                   needs (one documented module);
* ``session``   -- one user's scene: open a CT, Segment (child process), results into MRML, box
                   correction, export (slicer-core, no trame);
* ``app``       -- the trame page: views (trame-slicer), controls, state, downloads;
* ``gateway``   -- per-user sessions: ``lsnet web`` starts one ``app`` process per browser session and
                   relays each browser to its own (aiohttp only, no Slicer).

Nothing here is imported by the engine at module level: ``lsnet web`` imports ``LSNetSegmentationWeb.gateway``
(or, with ``--single-session``, ``LSNetSegmentationWeb.app``) inside its command function.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_UPLOAD_LIMIT_MB = 1024
