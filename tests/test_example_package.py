"""
Tests of the examples: the third-party plugin package in
C{examples/fedhub-example-consumer} installed next to fedhub in a fresh
virtual environment, and C{examples/consumers.toml}.

The install test builds both wheels from the checkout with this
interpreter's setuptools (copies of the sources, so the checkout gets no
build directories), creates a virtual environment without system site
packages, installs both wheels and pytest into it with this interpreter's
pip (dependencies come from the package index, through pip's cache), then,
from a directory outside the checkout, runs the example's own tests, asks
fedhub for the plugin by name and checks a configuration that uses it.
"""

# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fedhub.config import load_config
from fedhub.hub import Hub

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fedhub-example-consumer"
CONSUMERS_TOML = ROOT / "examples" / "consumers.toml"


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """
    Run a command; fail with its output when it fails.
    """
    result = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def copy_source(source: Path, target: Path) -> Path:
    """
    Copy a source tree without build leftovers.
    """
    shutil.copytree(
        source, target,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dropin.cache",
                                      ".venv", ".git", ".mypy_cache", ".pytest_cache",
                                      ".hypothesis", "_trial_temp*", "tests.*"),
    )
    return target


class ExamplePackageTests(SynchronousTestCase):
    """
    The example plugin package, installed for real.
    """

    def test_install_test_and_discover(self) -> None:
        """Installed beside fedhub, the example's tests pass and fedhub finds package-watch by name."""
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        environ["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        wheels = work / "wheels"
        wheels.mkdir()
        fedhub_src = copy_source(ROOT, work / "fedhub-src")
        example_src = copy_source(EXAMPLE, work / "example-src")
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--quiet", "--wheel-dir", str(wheels), str(fedhub_src), str(example_src)],
            work, environ)
        built = sorted(p.name for p in wheels.glob("*.whl"))
        self.assertEqual(len(built), 2, built)

        # A new environment without pip of its own (ensurepip takes seconds):
        # this interpreter's pip installs into it.
        env_dir = work / "venv"
        venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
        python = str(env_dir / "bin" / "python")
        run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
             "--no-compile", *map(str, wheels.glob("*.whl")), "pytest"],
            work, environ, timeout=600)

        # Run outside any checkout, on a copy of the tests, so only the
        # installed packages can be imported.
        outside = work / "elsewhere"
        outside.mkdir()
        shutil.copytree(EXAMPLE / "tests", outside / "tests",
                        ignore=shutil.ignore_patterns("__pycache__"))
        report = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                      "--rootdir", str(outside), "tests"], outside, environ)
        self.assertIn("passed", report)
        self.assertNotIn("failed", report)

        probe = textwrap.dedent("""
            import fedhub, fedhub_example_consumer
            from fedhub.plugins import consumer_plugins, find_consumer_plugin
            plugin = find_consumer_plugin("package-watch")
            print(type(plugin).__module__)
            print(" ".join(sorted(consumer_plugins())))
            print(fedhub.__file__)
            print(fedhub_example_consumer.__file__)
        """)
        module, names, fedhub_file, example_file = run(
            [python, "-c", probe], outside, environ).split("\n")[:4]
        self.assertEqual(module, "fedhub_example_consumer.package_watch")
        self.assertLessEqual({"package-watch", "log", "exec", "webhook", "record", "bridge"},
                             set(names.split()))
        self.assertTrue(fedhub_file.startswith(str(env_dir)), fedhub_file)
        self.assertTrue(example_file.startswith(str(env_dir)), example_file)

        config = outside / "watch.toml"
        config.write_text(textwrap.dedent("""
            [hub]
            state_dir = "state"
            [domains.infra]
            broker = "memory"
            [[consumers]]
            name = "watch"
            plugin = "package-watch"
            domain = "infra"
            packages = ["kernel"]
        """))
        checked = run([str(env_dir / "bin" / "fedhub"), "check-config", str(config)],
                      outside, environ)
        self.assertIn("OK", checked)


class ConsumersExampleTests(SynchronousTestCase):
    """
    C{examples/consumers.toml}, with the files it names created.
    """

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        (self.dir / "secrets").mkdir(parents=True)
        self.config = self.dir / "consumers.toml"
        shutil.copy(CONSUMERS_TOML, self.config)

    def test_checks_and_builds(self) -> None:
        """With its files present the example passes the checks and the hub builds every consumer."""
        (self.dir / "secrets" / "hooks-ca.pem").write_text("")
        (self.dir / "secrets" / "hooks-token").write_text("Bearer x\n")
        config = load_config(str(self.config))
        plugins = sorted({c.plugin for c in config.consumers})
        self.assertEqual(plugins, ["bridge", "exec", "log", "record", "webhook"])
        hub = Hub(config, Clock())
        self.assertEqual(sorted(hub.consumers), sorted(c.name for c in config.consumers))

    def test_missing_files_reported(self) -> None:
        """Without the files it names, the check reports both, by key path."""
        from fedhub.errors import ConfigError

        with self.assertRaises(ConfigError) as caught:
            load_config(str(self.config))
        paths = sorted(p.path for p in caught.exception.problems)
        self.assertEqual(paths, ["consumers[3].authorization_file", "consumers[3].ca"])
