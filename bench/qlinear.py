"""Benchmarks of pypaper's quantized linear layers (issue #7): y = x W^T + b, K = N = 4096.

Cases, for M in {1, 32, 256} tokens (rows of x):
  "int8 dynamic linear"      per-token int8 activations, per-channel int8 weights, int32 GEMM
  "int8 weight-only linear"  int8 per-channel weights, fp32 activations
  "int4 weight-only linear"  4-bit weights, groups of 128, fp32 activations

Providers: "fp32 nn.Linear" (the baseline of the speedup column: torch's sgemm, MKL / oneDNN),
"torch.ao dynamic" (torch.ao.quantization.quantize_dynamic, fbgemm; int8 dynamic case),
"torchao <config>" (torchao.quantization.quantize_ with Int8DynamicActivationInt8WeightConfig /
Int8WeightOnlyConfig / Int4WeightOnlyConfig, where they run), "pypaper" (the default C++ path:
AVX-512 VNNI where compiled, else AVX2), "pypaper avx2" (PYPAPER_QLINEAR_ISA=avx2: the path of
AVX2 machines without VNNI), "pypaper 7-bit" (Int8DynamicConfig(act_bits=7), fbgemm's
reduce_range activations, the fast AVX2 encoding), "reference" (pypaper's plain-PyTorch backend).

GB/s counts the weight bytes (codes + scales) plus x and y in fp32: the traffic of a
memory-bound layer. GOP/s (2 M K N / time, int or float multiply-adds alike) and its ratio to
the fp32 matmul throughput measured in the same run are printed by ``python -m bench.qlinear``
(and by :func:`gops_table`), since the shared table has no operation-count column.
"""
import argparse
import contextlib
import copy
import os
import warnings

from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, unavailable

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pypaper  # noqa: E402
from pypaper.quant import (Int4WeightOnlyConfig, Int8DynamicConfig, Int8WeightOnlyConfig,  # noqa: E402
                           quantize_)

K = N = 4096
MS = (1, 32, 256)
GROUP = 128
BASELINE = "fp32 nn.Linear"

warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def _isa(name):
    old = os.environ.get("PYPAPER_QLINEAR_ISA")
    os.environ["PYPAPER_QLINEAR_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYPAPER_QLINEAR_ISA", None)
        else:
            os.environ["PYPAPER_QLINEAR_ISA"] = old


def _call(model, x, isa=None, backend=None):
    def run():
        with torch.no_grad():
            with _isa(isa) if isa else contextlib.nullcontext():
                with pypaper.use_backend(backend) if backend else contextlib.nullcontext():
                    return model(x)

    return run


def _isa_reason(isa: str):
    from pypaper.quant import qlinear_ops

    w = qlinear_ops.prepare_int8_dynamic(torch.randn(4, 4))
    with _isa(isa):
        try:
            torch.ops.pypaper.int8_dynamic_linear(torch.randn(1, 4), *w, None, 127)
        except RuntimeError as e:
            return str(e).splitlines()[0]
    return None


def _torchao(base, config_name, **kw):
    try:
        import torchao.quantization as tq  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
        return None, f"torchao failed to import under torch {torch.__version__} ({type(e).__name__}: {e})"
    try:
        cfg = getattr(tq, config_name)(**kw)
        m = copy.deepcopy(base)
        tq.quantize_(m, cfg)
    except Exception as e:  # noqa: BLE001
        return None, f"torchao {config_name} cannot quantize on this machine ({type(e).__name__}: {str(e)[:120]})"
    return m, None


def _providers(kind: str, m_rows: int, device: str, k: int = K, n: int = N) -> list:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(k, n)).to(device)
    x = torch.randn(m_rows, k, device=device)
    out = [Provider(BASELINE, {"fwd": _call(base, x)})]

    def ours(name, cfg, isa=None, backend=None):
        if isa:
            why = _isa_reason(isa)
            if why:
                return unavailable(name, why)
        m = quantize_(copy.deepcopy(base), cfg)
        return Provider(name, {"fwd": _call(m, x, isa, backend)})

    def tao(name, config_name, **kw):
        m, why = _torchao(base, config_name, **kw)
        return unavailable(name, why) if m is None else Provider(name, {"fwd": _call(m, x)})

    if kind == "int8 dynamic linear":
        try:
            qd = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear},
                                                        dtype=torch.qint8)
            out.append(Provider("torch.ao dynamic", {"fwd": _call(qd, x)}))
        except Exception as e:  # noqa: BLE001
            out.append(unavailable("torch.ao dynamic", f"{type(e).__name__}: {e}"))
        out.append(tao("torchao int8 dynamic", "Int8DynamicActivationInt8WeightConfig"))
        out += [ours("pypaper", Int8DynamicConfig()),
                ours("pypaper 7-bit", Int8DynamicConfig(act_bits=7)),
                ours("pypaper avx2 7-bit", Int8DynamicConfig(act_bits=7), isa="avx2"),
                ours("pypaper avx2", Int8DynamicConfig(), isa="avx2"),
                ours("reference", Int8DynamicConfig(), backend="reference")]
    elif kind == "int8 weight-only linear":
        out.append(tao("torchao int8 weight-only", "Int8WeightOnlyConfig"))
        out += [ours("pypaper", Int8WeightOnlyConfig()),
                ours("pypaper avx2", Int8WeightOnlyConfig(), isa="avx2"),
                ours("reference", Int8WeightOnlyConfig(), backend="reference")]
    else:
        out.append(tao("torchao int4 weight-only", "Int4WeightOnlyConfig", group_size=GROUP))
        out += [ours("pypaper", Int4WeightOnlyConfig(GROUP)),
                ours("pypaper avx2", Int4WeightOnlyConfig(GROUP), isa="avx2"),
                ours("reference", Int4WeightOnlyConfig(GROUP), backend="reference")]
    return out


def _weight_bytes(kind: str) -> int:
    if kind == "int8 dynamic linear":
        return K * N + 8 * N  # codes, fp32 scale and int32 column sum per channel
    if kind == "int8 weight-only linear":
        return K * N + 4 * N
    return K * N // 2 + 8 * N * (K // GROUP)  # nibbles, fp32 scale and zero per group


KINDS = ("int8 dynamic linear", "int8 weight-only linear", "int4 weight-only linear")


def case(kind: str, m_rows: int, device: str, k: int = K, n: int = N) -> Case:
    io = 4 * m_rows * (k + n) + 4 * n  # x, y, bias
    return Case(kind, (m_rows, k, n), torch.float32, device,
                bytes_moved={"fwd": _weight_bytes(kind) * (k * n) // (K * N) + io},
                providers=lambda: _providers(kind, m_rows, device, k, n),
                bytes_note="the quantized weights (codes + scales) + x + y + bias, fp32 "
                           "activations (nn.Linear moves 4 bytes per weight)",
                baseline=BASELINE)


def cases(device: str = "cpu", quick: bool = False, numel: int = None) -> list:
    """Quick and full: M in {1, 32, 256}, K = N = 4096, the three kinds (full mode repeats more).
    ``numel`` (smoke tests): M = 1 and 8 at K = N = 256, each kind."""
    if numel:
        return [case(kind, m, device, 256, 256) for kind in KINDS for m in (1, 8)]
    return [case(kind, m, device) for kind in KINDS for m in MS]


def gops_table(results, limits) -> str:
    """GOP/s = 2 M K N / time per row and its ratio to the fp32 matmul throughput of the run."""
    lines = ["| kernel | M | provider | median ms | GOP/s | % fp32 matmul | speedup |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        if r.median_s is None:
            continue
        m_rows, k, n = r.case.shape
        gops = 2 * m_rows * k * n / r.median_s / 1e9
        speedup = f"{r.speedup:.2f}x" if r.speedup else "—"
        lines.append(f"| {r.case.kernel} | {m_rows} | {r.provider} | {r.median_s * 1e3:.3f} | "
                     f"{gops:.1f} | {100 * gops / limits.matmul_gflops:.0f} | {speedup} |")
    return "\n".join(lines)


def _median_ms(fn, repeats: int) -> float:
    import statistics
    import time

    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def decode_table(layers: int = 24, repeats: int = 15) -> str:
    """M = 1 (one decoded token) per layer, K = N = 4096, in two memory regimes, every provider
    in the same run: "hot", one layer called again and again (its weights stay in the last-level
    cache: 64 MB fp32, 9.4 MB int4); "streamed", ``layers`` distinct layers called in turn, as a
    model's layers are during decoding (fp32: 1.5 GB, int4: 226 MB, so the weights come from
    DRAM or, for int4, partly from a large L3). The harness's round-robin table is a third
    regime: there each call follows 256 MB of copy / clone probes whose dirty cache lines are
    written back while the next call reads."""
    torch.manual_seed(0)
    x = torch.randn(1, K)
    fp32 = [nn.Linear(K, N) for _ in range(layers)]
    q4 = [quantize_(nn.Sequential(copy.deepcopy(m)), Int4WeightOnlyConfig(GROUP)) for m in fp32]
    q8 = [quantize_(nn.Sequential(copy.deepcopy(m)), Int8DynamicConfig()) for m in fp32]
    rows = []
    with torch.no_grad():
        for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
            torch.set_num_threads(threads)
            for regime in ("hot", "streamed"):
                def run(ms):
                    if regime == "hot":
                        return lambda: [ms[0](x) for _ in range(layers)]
                    return lambda: [m(x) for m in ms]
                t = {name: _median_ms(run(ms), repeats) / layers
                     for name, ms in (("fp32", fp32), ("int4", q4), ("int8", q8))}
                with _isa("avx2"):
                    t["int4 avx2"] = _median_ms(run(q4), repeats) / layers
                rows.append(f"| {threads} | {regime} | {t['fp32']:.3f} | {t['int4']:.3f} | "
                            f"{t['int4 avx2']:.3f} | {t['int8']:.3f} | {t['fp32'] / t['int4']:.2f}x | "
                            f"{t['fp32'] / t['int4 avx2']:.2f}x | {t['fp32'] / t['int8']:.2f}x |")
    head = ("| threads | regime | fp32 ms | int4 g128 ms | int4 avx2 ms | int8 dynamic ms | "
            "fp32 / int4 | fp32 / int4 avx2 | fp32 / int8 |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    return head + "\n" + "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.qlinear", description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--decode", action="store_true",
                   help="only the M = 1 table in the hot and streamed regimes (decode_table)")
    args = p.parse_args(argv)
    if args.decode:
        print(decode_table())
        return 0
    limits = harness.measure_limits("cpu")
    report = harness.run_family("qlinear", cases("cpu", True), "cpu",
                                harness.Timing(repeats=args.repeats, budget_s=2.0),
                                make_plot=not args.no_plot, limits=limits)
    print(report.markdown)
    print()
    print(gops_table(report.results, limits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
