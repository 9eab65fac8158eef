import subprocess
import sys

from PIL import Image

from minidiff.cli import main


def test_demo_writes_its_pictures(tmp_path, capsys):
    assert main(["demo", "--quick", "-o", str(tmp_path)]) == 0
    with Image.open(tmp_path / "forward_noising.png") as im:
        assert im.size == (7 * 128, 128)
        assert im.text["schedule"] == "linear" and im.text["seed"] == "0"
    with Image.open(tmp_path / "samples_2d.png") as im:
        assert im.size[0] > 300
    out = capsys.readouterr().out
    assert "component weights" in out


def test_demo_with_a_missing_image_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minidiff.cli", "demo", "--quick", "--image", str(tmp_path / "nope.png"),
                        "-o", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "image file not found" in r.stderr and "Traceback" not in r.stderr


def test_demo_with_an_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    assert main(["demo", "--quick", "--image", str(bad), "-o", str(tmp_path)]) == 2
