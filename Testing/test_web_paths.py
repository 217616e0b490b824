"""The web app's file-access rules (``LSNetSegmentationWeb.paths``) and ``lsnet web`` without trame-slicer."""

from __future__ import annotations

import sys

import pytest

from LSNetSegmentationWeb import paths
from lsnet.errors import InputError


@pytest.fixture
def root(tmp_path):
    data = tmp_path / "data"
    (data / "case1").mkdir(parents=True)
    (data / "ct.nrrd").write_bytes(b"x")
    (data / "case1" / "IM0001.dcm").write_bytes(b"x")
    (tmp_path / "secret.nrrd").write_bytes(b"x")
    (data / "out.nrrd").symlink_to(tmp_path / "secret.nrrd")
    (data / "up").symlink_to(tmp_path)
    (data / "inside.nrrd").symlink_to(data / "ct.nrrd")
    return paths.DataRoot(data)


def test_inside_paths_resolve(root):
    assert root.resolve("ct.nrrd") == root.root / "ct.nrrd"
    assert root.resolve("case1") == root.root / "case1"
    assert root.resolve("inside.nrrd") == root.root / "ct.nrrd"  # a link that stays inside is fine


@pytest.mark.parametrize("bad, words", [
    ("../secret.nrrd", "outside the data root"),
    ("case1/../../secret.nrrd", "outside the data root"),
    ("/etc/passwd", "outside the data root"),
    ("out.nrrd", "symbolic link"),
    ("up/secret.nrrd", "symbolic link"),
    ("missing.nrrd", "does not exist"),
    ("", "No file given"),
    ("a\x00b", "NUL"),
])
def test_outside_or_bad_paths_refused(root, bad, words):
    with pytest.raises(InputError, match=words) as info:
        root.resolve(bad)
    assert "\n" not in str(info.value)


def test_entries_list_images_and_dicom_folders_only_inside(root):
    listed = {e.path: e.kind for e in root.entries()}
    assert listed["ct.nrrd"] == "image" and listed["case1"] == "dicom"
    assert "out.nrrd" not in listed and not any(p.startswith("up/") for p in listed)


def test_upload_rules():
    assert paths.upload_name("../../x/my ct.nii.gz") == "my_ct.nii.gz"
    with pytest.raises(InputError, match="not an image file"):
        paths.upload_name("evil.sh")
    paths.check_upload_size(10, 10)
    with pytest.raises(InputError, match="over the limit"):
        paths.check_upload_size(11, 10)


def test_data_root_must_be_a_folder(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        paths.DataRoot(tmp_path / "nope")


def test_lsnet_web_without_trame_slicer_is_a_one_line_error(monkeypatch, capsys):
    from lsnet.app import cli

    monkeypatch.setitem(sys.modules, "trame_slicer", None)  # as if not installed
    assert cli.main(["web", "--data-root", "."]) == cli.EXIT_USER
    err = capsys.readouterr().err.strip()
    assert err.startswith("lsnet: error: lsnet web needs trame-slicer") and "\n" not in err


def test_only_a_non_local_host_prints_the_no_authentication_warning(monkeypatch, capsys, tmp_path):
    from LSNetSegmentationWeb import app as webapp

    started = []

    class NoServer:  # stands in for the trame page: this test is about serve()'s warning only
        def __init__(self, data_root, **_):
            self.data_root = paths.DataRoot(data_root)

        def start(self, host, port):
            started.append((host, port))

        def close(self):
            pass

    monkeypatch.setattr(webapp, "LSNetWebApp", NoServer)
    webapp.serve(tmp_path, host="0.0.0.0", port=9)
    assert "no authentication" in capsys.readouterr().err
    webapp.serve(tmp_path, host="127.0.0.1", port=9)
    assert "WARNING" not in capsys.readouterr().err
    assert started == [("0.0.0.0", 9), ("127.0.0.1", 9)]
