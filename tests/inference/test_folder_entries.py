"""Folder entries that are not regular image files (FIFOs, symlink loops, symlinked folders): listed and
reported by ``encode(folder)``, never opened, never followed into a cycle."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest

from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference import image_files
from visreg_hub.inference.images import ImageSource, decode_image
from visreg_hub.inference.inputs import list_image_files

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")

FIFO_REASON = "not a regular file (a FIFO, socket or device)"
LOOP_REASON = f"cannot read this entry ({os.strerror(errno.ELOOP)}); fix or remove it"


@contextlib.contextmanager
def fifo_guard(path: Path):
    """Whoever opens the FIFO ``path`` for reading (a bug) reads end-of-file at once instead of blocking
    the test run forever: a writer end is opened and closed for every reader that shows up."""
    done = threading.Event()

    def release() -> None:
        while not done.wait(0.02):
            with contextlib.suppress(OSError):  # ENXIO: no reader has the FIFO open, as it should be
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _special_folder(root: Path, photo: Path) -> Path:
    """``root`` with one photo, a FIFO, a symlink loop, a cycle of symlinked folders and hidden entries."""
    (root / "sub").mkdir(parents=True)
    (root / "photo.jpg").write_bytes(photo.read_bytes())
    (root / "sub" / "inner.png").write_bytes(photo.read_bytes())
    os.mkfifo(root / "fifo.jpg")
    (root / "loop1.jpg").symlink_to("loop2.jpg")
    (root / "loop2.jpg").symlink_to("loop1.jpg")
    (root / "sub" / "up").symlink_to("..")  # a cycle, if symlinked folders were followed
    (root / "alias").symlink_to(root / "sub")  # ... and a second copy of inner.png
    (root / "folder.jpg").symlink_to(root / "sub")  # an image name on a folder: not an image
    (root / ".hidden").mkdir()
    os.mkfifo(root / ".hidden" / "pipe.jpg")
    os.mkfifo(root / "notes.txt")  # not an image name: never listed
    return root


def test_a_fifo_and_a_symlink_loop_are_listed_and_symlinked_folders_are_not_followed(tmp_path, photo_paths):
    root = _special_folder(tmp_path / "imgs", photo_paths[0])
    found = [path.relative_to(root).as_posix() for path in list_image_files(root)]
    assert found == ["fifo.jpg", "loop1.jpg", "loop2.jpg", "photo.jpg", "sub/inner.png"]


def test_encode_folder_reports_a_fifo_and_a_symlink_loop_without_opening_the_fifo(tmp_path, photo_paths):
    from tests.fixtures_models import tiny_encoder

    root = _special_folder(tmp_path / "imgs", photo_paths[0])
    model = tiny_encoder(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with fifo_guard(root / "fifo.jpg"):
        result = model.encode(root, on_error="skip")
        expected = model.encode([root / "photo.jpg", root / "sub" / "inner.png"])
    assert result.embeddings.shape[0] == 2
    assert (result.embeddings - expected).abs().max() < 1e-5
    reasons = {failure.index: failure.reason for failure in result.failures}
    assert sorted(reasons) == [0, 1, 2]  # fifo.jpg, loop1.jpg, loop2.jpg in listing order
    assert reasons[0] == f"{root / 'fifo.jpg'}: {FIFO_REASON}; only image files are embedded"
    assert reasons[1] == f"{root / 'loop1.jpg'}: {LOOP_REASON}"
    assert reasons[2] == f"{root / 'loop2.jpg'}: {LOOP_REASON}"


def test_decoding_a_fifo_socket_or_loop_path_names_the_problem(tmp_path):
    import socket

    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "gone.png").symlink_to("missing.png")
    server = socket.socket(socket.AF_UNIX)
    with contextlib.closing(server), fifo_guard(tmp_path / "fifo.png"):
        server.bind(str(tmp_path / "sock.png"))
        for name, reason in (("fifo.png", FIFO_REASON), ("sock.png", FIFO_REASON), ("a.png", LOOP_REASON),
                             ("gone.png", "a symlink whose target does not exist; fix or remove the link"),
                             ("never.png", "file not found; check the path")):  # fmt: skip
            with pytest.raises(ImageDecodeError) as caught:
                decode_image(tmp_path / name)
            assert str(caught.value).startswith(f"{tmp_path / name}: {reason}")
        with pytest.raises(ImageDecodeError, match=r": is a directory, not an image file; pass the folder"):
            decode_image(ImageSource(tmp_path, "folder"))


def test_a_path_swapped_for_a_fifo_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    """The check and the open are two steps; a FIFO that appears between them must still not block."""
    os.mkfifo(tmp_path / "swapped.jpg")
    monkeypatch.setattr(image_files, "file_problem", lambda path: None)  # as if it was a file when checked
    with fifo_guard(tmp_path / "swapped.jpg"), pytest.raises(ImageDecodeError) as caught:
        decode_image(tmp_path / "swapped.jpg")
    assert str(caught.value) == f"{tmp_path / 'swapped.jpg'}: {FIFO_REASON}; only image files are embedded"
