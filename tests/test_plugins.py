"""Third-party passes and calibrators: --plugin module and entry points, used by name in recipes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import RECIPES

PLUGIN = textwrap.dedent('''
    import numpy as np
    from qcompile.calibration import Calibrator, Range
    from qcompile.pipeline import Pass, PassResult, Phase
    from qcompile.registry import register_calibrator, register_pass

    @register_pass("count_convs")
    class CountConvs(Pass):
        """Counts Conv nodes; changes nothing."""
        phase = Phase.TRANSFORM

        def run(self, graph, ctx):
            return PassResult(modified=False, stats={"convs": sum(n.op_type == "Conv" for n in graph.nodes)})

    @register_calibrator("half_max")
    class HalfMax(Calibrator):
        """Clips every activation at half its observed |max| (a deliberately odd choice to observe)."""
        def __init__(self, spec, options=None):
            super().__init__(spec, options)
            self.amax = 0.0

        def observe(self, x):
            self.amax = max(self.amax, float(np.abs(x).max()))
            self.samples += 1

        def compute_range(self):
            self._require_data()
            return Range(np.float32(-self.amax / 2), np.float32(self.amax / 2))
''')

RECIPE = (RECIPES / "int8_sym.yaml").read_text().replace(
    "passes:\n", "passes:\n  - count_convs\n").replace("    calibrator: max\ncalibration", "    calibrator: half_max\ncalibration")


def _run(tmp_path, *extra, env_path):
    recipe = tmp_path / "plugin.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out.onnx"
    cmd = [sys.executable, "-m", "qcompile.cli", str(RECIPES.parent / "examples/digits/digits_mobilenet.onnx"),
           "--recipe", str(recipe), "--calib", str(RECIPES.parent / "examples/digits/calib.npz"), "-o", str(out), "-q", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return proc, out


def _check(proc, out):
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_name("out.report.json").read_text())
    assert report["passes"][0] == {"name": "count_convs", "seconds": report["passes"][0]["seconds"],
                                   "modified": False, "stats": {"convs": 25}}
    activation_ranges = [r for r in report["ranges"] if r["kind"] == "activation"]
    assert activation_ranges and all(r["calibrator"] == "half_max" for r in activation_ranges)


def test_plugin_module_on_command_line(tmp_path):
    (tmp_path / "my_qplugin.py").write_text(PLUGIN)
    proc, out = _run(tmp_path, "--plugin", "my_qplugin", env_path=tmp_path)
    _check(proc, out)


def test_plugin_without_registration_is_unknown(tmp_path):
    proc, out = _run(tmp_path, env_path=tmp_path)
    assert proc.returncode == 2 and "unknown calibrator 'half_max'" in proc.stderr and not out.exists()


def test_missing_plugin_module(tmp_path):
    proc, _ = _run(tmp_path, "--plugin", "no_such_plugin_mod", env_path=tmp_path)
    assert proc.returncode == 2 and "--plugin no_such_plugin_mod: module not found" in proc.stderr


def test_entry_points(tmp_path):
    (tmp_path / "ep_qplugin.py").write_text(PLUGIN)
    dist = tmp_path / "ep_qplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-qplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[qcompile.passes]\ncount_convs = ep_qplugin:CountConvs\n\n[qcompile.calibrators]\nhalf_max = ep_qplugin:HalfMax\n")
    proc, out = _run(tmp_path, env_path=tmp_path)
    _check(proc, out)
