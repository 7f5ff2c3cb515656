"""
Tests of the distribution: the wheel holds the twistd plugin and nothing that
would shadow Twisted's own plugin package, and a non-editable install in a
fresh virtual environment makes C{twistd fedhub} exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(directory: Path) -> Path:
    """
    Build fedhub's wheel from the checkout into C{directory} and return its path.
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(directory), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=str(directory),
    )
    (wheel,) = directory.glob("fedhub-*.whl")
    return wheel


_built: dict[str, Path] = {}


def shared_wheel() -> Path:
    """
    The wheel built once for all the tests of L{WheelTests}.
    """
    if "wheel" not in _built:
        directory = Path(tempfile.mkdtemp(prefix="fedhub-wheel-"))
        _built["wheel"] = build_wheel(directory)
    return _built["wheel"]


class WheelTests(SynchronousTestCase):
    """
    The contents of the built wheel.
    """

    def setUp(self) -> None:
        self.wheel = shared_wheel()
        with zipfile.ZipFile(self.wheel) as archive:
            self.names = set(archive.namelist())

    def test_plugin_file(self) -> None:
        """The twistd plugin module is in the wheel under twisted/plugins/."""
        self.assertIn("twisted/plugins/fedhub_plugin.py", self.names)
        self.assertIn("twisted/plugins/fedhub_builtins.py", self.names)

    def test_no_plugin_package_init(self) -> None:
        """The wheel ships neither twisted/plugins/__init__.py nor a dropin.cache."""
        self.assertNotIn("twisted/plugins/__init__.py", self.names)
        self.assertNotIn("twisted/__init__.py", self.names)
        self.assertEqual([n for n in self.names if n.endswith("dropin.cache")], [])

    def test_package_data(self) -> None:
        """The package and its data files are in the wheel; the tests are not."""
        self.assertIn("fedhub/__init__.py", self.names)
        self.assertIn("fedhub/message.py", self.names)
        self.assertEqual([n for n in self.names if n.startswith("tests/")], [])

    def test_console_script(self) -> None:
        """The wheel declares the fedhub console script."""
        (entry_points,) = [n for n in self.names if n.endswith(".dist-info/entry_points.txt")]
        with zipfile.ZipFile(self.wheel) as archive:
            text = archive.read(entry_points).decode()
        self.assertIn("fedhub = fedhub.cli:entry", text)


class FreshInstallTests(SynchronousTestCase):
    """
    A non-editable install into a new virtual environment, used from outside
    the checkout.
    """

    def test_twistd_lists_fedhub(self) -> None:
        """After installing the wheel, `twistd --help` lists fedhub and `fedhub --version` runs."""
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        wheel = build_wheel(work)
        env_dir = work / "venv"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
            check=True,
            capture_output=True,
            cwd=str(work),
            env=environ,
            timeout=600,
        )
        outside = work / "elsewhere"
        outside.mkdir()
        result = subprocess.run(
            [str(env_dir / "bin" / "twistd"), "--help"],
            capture_output=True,
            text=True,
            cwd=str(outside),
            env=environ,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")]
        self.assertIn("fedhub", commands)
        version = subprocess.run(
            [str(env_dir / "bin" / "fedhub"), "--version"],
            capture_output=True,
            text=True,
            cwd=str(outside),
            env=environ,
            timeout=120,
        )
        self.assertEqual(version.returncode, 0, version.stderr)
        self.assertTrue(version.stdout.startswith("fedhub "), version.stdout)
        # The installed package is the one used, not the checkout.
        where = subprocess.run(
            [str(python), "-c", "import fedhub; print(fedhub.__file__)"],
            capture_output=True,
            text=True,
            cwd=str(outside),
            env=environ,
            timeout=60,
        )
        self.assertTrue(where.stdout.strip().startswith(str(env_dir)), where.stdout)
