"""Every experiment's results.json names the machine its figures came from."""
import json
import os

from experiments.results_file import machine, write_results


def test_results_name_the_cpu_its_flags_and_jax(tmp_path, capsys):
    m = machine()
    assert m["cpu"] and m["cores"] == os.cpu_count() and m["jax_platform"] == "cpu"
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert all(f in flags for f in m["cpu_flags"])
    out = write_results(str(tmp_path), {"figure": 1.5, "machine": {"cpus": 2}})
    written = json.loads((out / "results.json").read_text())
    assert written["figure"] == 1.5 and written["machine"]["cpus"] == 2
    assert written["machine"]["cpu"] == m["cpu"]
    assert f"machine: {m['cpu']}, {m['cores']} cores" in capsys.readouterr().out
