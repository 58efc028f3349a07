"""`python -m iwae_bench profile`: the columns on a real kernel, against values known by hand."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iwae_bench.profile.kernels import LATENT_LAYERS, LIKELIHOOD_MUFU, COLUMNS, TARGET_INSTRUCTIONS

ROOT = Path(__file__).resolve().parent.parent
ISSUE_COLUMNS = ["kernel", "dtype", "config", "num_warps", "num_stages", "registers", "spills",
                 "shared_bytes", "loop_instructions_per_element", "mufu_per_element",
                 "software_transcendentals_in_loop", "logits_load_bits", "resident_warps_per_sm",
                 "shape", "input_bytes", "programs_per_sm", "bytes_in_flight_per_sm"]


def _profile(out, kernel) -> list[dict]:
    """The CLI's rows for ``--kernel KERNEL``, the first config of each launch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}  # the CLI turns it off
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "profile", "--kernel", kernel,
                           "--max-configs", "1", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with open(out / "profile.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fused_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    rows = _profile(out, "fused forward")
    # the likelihoods' rows (kernels/likelihood.py) apart: test_likelihood_rows_meet_their_floors
    return out, [r for r in rows if not _likelihood(r)], [r for r in rows if _likelihood(r)]


def _likelihood(row) -> str:
    return next((spec for spec in LIKELIHOOD_MUFU if row["kernel"].endswith(spec)), "")


def test_profile_has_the_columns_and_one_row_per_scenario(fused_profile):
    out, rows, _ = fused_profile
    assert set(ISSUE_COLUMNS) <= set(COLUMNS) and list(rows[0]) == COLUMNS
    # four scenarios (plain, saving log_w, and saving it with the family's epilogues: MIWAE's
    # groups, CIWAE's mean with a scale) x two dtypes x four validate shapes, one config each;
    # and the two-layer model's bound (stochastic layers as an offset) x two dtypes at one shape
    assert len(rows) == 4 * 2 * 4 + 2
    assert {r["kernel"] for r in rows} == {"fused forward", "fused forward, saving log_w",
                                           "fused forward, saving log_w, miwae M=2",
                                           "fused forward, saving log_w, ciwae beta=0.25 scale=0.5",
                                           "fused forward, saving log_w, latent offset"}
    assert {r["shape"] for r in rows} == {"B=1024 k=64", "B=20 k=5000", "B=256 k=256", "B=8 k=100000", "B=100 k=64"}
    text = (out / "profile.md").read_text()
    assert "A proxy read from the compiler's output, not a measurement" in text
    assert "triton" in text and "sm_90" in text


def test_likelihood_rows_meet_their_floors(fused_profile):
    """Each likelihood's fused forward takes exactly the MUFU ops its arithmetic needs per
    element (LIKELIHOOD_MUFU: 0 for a Gaussian with a given variance, 1 with a read one, 2 for
    the continuous Bernoulli, 4 for the logistic), all in hardware."""
    _, _, rows = fused_profile
    assert {_likelihood(r) for r in rows} == set(LIKELIHOOD_MUFU) and len(rows) == 2 * len(LIKELIHOOD_MUFU)
    for r in rows:
        assert float(r["mufu_per_element"]) == LIKELIHOOD_MUFU[_likelihood(r)][0], r["kernel"]
        assert int(r["software_transcendentals_in_loop"]) == 0, r["kernel"]
    cb = next(r for r in rows if _likelihood(r) == "continuous_bernoulli")
    assert cb["mufu_kinds"] == "EX2:1.00 LG2:1.00"


def test_profile_values_on_the_fused_forward(fused_profile):
    _, rows, _ = fused_profile
    for r in rows:
        assert int(r["registers"]) > 0 and int(r["num_warps"]) in (4, 8)
        # one exp per logit, in one MUFU op, and no software log in the hot loop
        assert r["mufu_kinds"] == "EX2:1.00" and float(r["mufu_per_element"]) == 1.0
        assert int(r["software_transcendentals_in_loop"]) == 0
        assert int(r["logits_load_bits"]) == 128  # the launch's alignment reaches the loads
        # the static target (forward <= 10 per element): a lost exp2 fold (tl.exp's denormal
        # guard) or a mask back in the hot loop puts it over
        assert 3.0 < float(r["loop_instructions_per_element"]) <= TARGET_INSTRUCTIONS["forward"]
    # (20, 5000) on 132 SMs: 528 programs wanted, 27 per example -> 256-sample splits -> 20 splits
    row = next(r for r in rows if r["shape"] == "B=20 k=5000" and r["dtype"] == "float32")
    assert int(row["programs"]) == 20 * 20 and float(row["programs_per_sm"]) == round(400 / 132, 2)
    # x, logits, z, mu and logvar, by hand
    assert int(row["input_bytes"]) == (20 * 784 + 20 * 5000 * 784 + 20 * 5000 * 50 + 2 * 20 * 50) * 4
    bf16 = next(r for r in rows if r["shape"] == "B=20 k=5000" and r["dtype"] == "bfloat16")
    assert int(bf16["input_bytes"]) == (20 * 784 + 20 * 5000 * 50 + 2 * 20 * 50) * 4 + 20 * 5000 * 784 * 2
    # bytes in flight = resident programs x tile x element size
    tile = 1
    for part in row["config"].split():
        tile *= int(part.split("=")[1])
    resident = int(row["resident_warps_per_sm"]) // int(row["num_warps"])
    assert int(row["bytes_in_flight_per_sm"]) == min(resident, 4) * tile * 4  # 400 programs: <= 4 per SM


def test_latent_scenarios_launch_the_two_layer_layouts():
    """The stochastic layers' scenarios launch the two-layer model's kernels as it does (captured,
    not compiled): h1 with q per example and p per sample, h2 with q per sample and no prior,
    at d = 100 / 50, forward and backward at k = 64, forward at 512, 32- and 16-bit; the bound's
    offset row with latent width 0 and OFFSET on."""
    import torch

    from iwae_bench.profile.kernels import scenarios
    from kernels._common import capture_launches

    kinds = {"h1": ((1, 1, 2, 2), 100), "h2": ((2, 2, 0, 0), 50)}
    seen = []
    for scenario in scenarios("latent"):
        with capture_launches(132) as launches:
            scenario.run()
        (launch,) = launches
        named = launch.named_args()
        dtype = getattr(torch, scenario.dtype)
        if scenario.kernel == "fused forward, saving log_w, latent offset":
            assert named["OFFSET"] and named["d"] == 0 and named["k"] == 64, scenario.kernel
            assert named["logits_ptr"].dtype == dtype and list(named["offset_ptr"].shape) == [100, 64]
            seen.append(("offset", scenario.dtype))
            continue
        direction = scenario.kernel.split(",")[0].removeprefix("latent ")
        layer = scenario.kernel.split(", ")[1][:2]
        assert launch.kernel.fn.__name__ == f"_latent_{direction}_kernel", scenario.kernel
        assert tuple(named[c] for c in ("QM", "QV", "PM", "PV")) == kinds[layer][0], scenario.kernel
        assert named["d"] == kinds[layer][1] and named["z_ptr"].dtype == dtype, scenario.kernel
        assert scenario.mufu_target == LATENT_LAYERS[scenario.kernel.split(", ", 1)[1]][2]
        seen.append((direction, layer, named["k"], scenario.dtype))
    expected = [(direction, layer, k, dtype) for dtype in ("float32", "bfloat16")
                for k, directions in ((64, ("forward", "backward")), (512, ("forward",)))
                for layer in ("h1", "h2") for direction in directions]
    assert sorted(seen) == sorted(expected + [("offset", "float32"), ("offset", "bfloat16")])


@pytest.fixture(scope="module")
def latent_profile(tmp_path_factory):
    return [r for r in _profile(tmp_path_factory.mktemp("profile"), "latent") if r["kernel"].startswith("latent")]


def test_latent_rows_meet_their_floors(latent_profile):
    """Compiled, each stochastic layer's kernels take the MUFU ops its arithmetic needs: h2 one
    exp per element (its absent prior's exp(-0) folded away); h1 one, plus its per-example
    log-variance's exp once per column of a thread's samples (not per sample: that would be
    2), all in hardware and spilling nothing."""
    rows = latent_profile
    assert len(rows) == 12
    for r in rows:
        layer = r["kernel"].split(", ", 1)[1]
        floor = LATENT_LAYERS[layer][2]
        assert r["mufu_kinds"].startswith("EX2:") and " " not in r["mufu_kinds"], r["kernel"]
        mufu = float(r["mufu_per_element"])
        assert (mufu == 1.0) if floor == 1.0 else (1.0 < mufu <= floor), (r["kernel"], mufu)
        assert int(r["software_transcendentals_in_loop"]) == 0 and int(r["spills"]) == 0, r["kernel"]
        assert int(r["registers"]) > 0 and float(r["loop_instructions_per_element"]) > 0
        B, k = 100, int(r["shape"].split()[1].removeprefix("k="))
        # the forward: a program per BLOCK_K samples of an example; the backward one per example
        block_k = int(r["config"].split()[0].removeprefix("BLOCK_K="))
        assert int(r["programs"]) == (B * k // block_k if "forward" in r["kernel"] else B), r["kernel"]
    h1 = next(r for r in rows if r["kernel"].startswith("latent forward, h1") and r["dtype"] == "float32"
              and r["shape"] == "B=100 k=64 d=100")
    # z and the prior's two [B, k, d], the posterior's two [B, d], by hand
    assert int(h1["input_bytes"]) == (3 * 100 * 64 * 100 + 2 * 100 * 100) * 4


def test_specialization_of_a_launch():
    """A launch's arguments -> what it compiles with: tensors aligned, 1 made a constant,
    multiples of 16 marked, other integers plain."""
    import torch

    from iwae_bench.profile.kernels import specialization

    class Param:
        def __init__(self, name, constexpr=False):
            self.name, self.is_constexpr = name, constexpr

    class Fn:
        params = [Param("x_ptr"), Param("n"), Param("stride"), Param("odd"), Param("scale"), Param("BLOCK", True)]
        arg_names = [p.name for p in params]

    named = {"x_ptr": torch.empty(4, device="meta", dtype=torch.bfloat16), "n": 64, "stride": 1,
             "odd": 7, "scale": 0.5}
    signature, constexprs, aligned = specialization(Fn, named, {"BLOCK": 128})
    assert signature == {"x_ptr": "*bf16", "n": "i32", "odd": "i32", "scale": "fp32"}
    assert constexprs == {"BLOCK": 128, "stride": 1}
    assert sorted(aligned) == ["n", "x_ptr"]


def test_summary_takes_each_shapes_best_config():
    """profile.md's summary, on rows known by hand: at each shape of 2 MB or more the config
    that meets the targets with the fewest instructions, else the one missing the fewest."""
    import pandas as pd

    from iwae_bench.profile.run import summarize

    def row(kernel, shape, config, instructions, met, misses="", inputs=4 << 20, mufu=1.0, regs=64, flight=16384):
        return {"kernel": kernel, "dtype": "float32", "shape": shape, "config": config,
                "loop_instructions_per_element": instructions, "mufu_per_element": mufu, "registers": regs,
                "bytes_in_flight_per_sm": flight, "input_bytes": inputs, "meets_static_targets": met,
                "misses": misses}

    frame = pd.DataFrame([
        row("fwd", "a", "wide", 9.0, "yes", regs=90),
        row("fwd", "a", "narrow", 7.0, "yes", regs=70, flight=32768),
        row("fwd", "a", "fewest but spills", 6.0, "no", "8 B of spills"),
        row("fwd", "b", "one miss", 8.0, "no", "2.0 MUFU/element > 1.0", mufu=2.0),
        row("fwd", "b", "two misses", 5.0, "no", "2.0 MUFU/element > 1.0; 8 B of spills", mufu=2.0),
        row("fwd", "tiny", "any", 1.0, "n/a (inputs under 2 MB)", inputs=1 << 20),
        row("head", "a", "only", 25.0, "n/a (no static target)"),
    ])
    got = summarize(frame).set_index("kernel")
    assert list(got.index) == ["fwd", "head"]
    fwd = got.loc["fwd"]
    assert fwd["shapes meeting the targets"] == "1 of 2"
    assert fwd["instructions per element"] == "7-8" and fwd["MUFU per element"] == "1-2"
    assert fwd["registers"] == "64-70" and fwd["KB in flight per SM"] == "16-32"
    assert fwd["what the best config misses"] == "2.0 MUFU/element > 1.0"
    assert got.loc["head", "shapes meeting the targets"] == "no target"
