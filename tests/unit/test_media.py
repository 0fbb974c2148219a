"""MP4 and contact-sheet writers: files come back with the frames and grid we wrote."""

import numpy as np
import pytest

from megagen.media.contact_sheet import contact_sheet, write_contact_sheet
from megagen.media.video_file import write_mp4

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")


def _video(frames=9, height=32, width=48):
    return np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)


def test_mp4_reads_back_with_frame_count_and_size(tmp_path):
    assert write_mp4(tmp_path / "a.mp4", _video(), fps=16)
    with av.open(str(tmp_path / "a.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9
    assert (frames[0].width, frames[0].height) == (48, 32)


def test_contact_sheet_grid_picks_first_and_last_frames(tmp_path):
    video = _video()
    sheet = contact_sheet([video, video, video], columns=4)
    assert sheet.shape == (3 * 32, 4 * 48, 3)
    assert np.array_equal(sheet[:32, :48], video[0])
    assert np.array_equal(sheet[:32, 3 * 48:], video[-1])
    assert write_contact_sheet(tmp_path / "s.png", [video, video], columns=4)
    assert Image.open(tmp_path / "s.png").size == (4 * 48, 2 * 32)
