"""Every Python block of README.md and docs/*.md runs as a new user pastes it (documentation review, s36).

The blocks are read from the markdown at test time, so an edit that breaks one fails here. A block
is named by its file, the markdown heading above it and its index under that heading (robust to
lines moving). Each case gives the block only the data it names and leaves to the user (a model,
x, y, ...: small shapes, built in a separate namespace); imports are the block's own job, so a
block that uses `torch`, `nn` or `pypaper` without importing them fails here as it would in a
fresh interpreter. After the block, the case checks the claims its comments make (a printed repr,
a shape, a type, "net(x) equals model(x)").

What this review found (before: as the docs held them):
- README `### pypaper.quant: quantized models`: six `quantize_` calls on one model; the second
  raised "a quantized model cannot be quantized again" (they are alternatives), and `pypaper.nn`
  was used without `import pypaper`.
- docs/quant_models.md, power-exponent block: the same (PowerExponentConfig twice, then
  learn=True and hawq_allocate on the already quantized model).
- README `### pypaper.hopfield`: `pypaper.ops` without `import pypaper` (NameError).
- README `### pypaper.local`: `nn` / `torch` without imports (NameError).
- docs/local.md, first block: `torch` not imported, and one `x` used both as [N, 784] rows
  (`tp.local_step`) and as the CNN's images (ValueError from one or the other).
- docs/local.md, Update 3 block: `nn` and `L` not imported.
- README `### pypaper.quant.fewbit`: the `approximation` repr in the comment was not what prints.

Blocks not run here, and why:
- README `### pypaper.snn` (the quick start): run as written, with its claims, by
  tests/snn/test_readme_claims_s35.py (it also needs SpikingJelly for its convert line).
- No block needs a GPU or a download: docs/gpu_runs.md holds bash only (the GPU check script),
  and the bash quick-start commands are not Python.
`test_every_python_block_has_a_case` fails when a block is added without a case here.
"""
import doctest
import os
import re

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_HEADING = re.compile(r"^(#{1,6} .*)$", re.M)


def python_blocks(relpath):
    """{(heading, index): code} of the ```python blocks of one markdown file, where heading is
    the last markdown heading line above the block (fenced blocks skipped when looking for it)
    and index counts the python blocks under that heading from 0."""
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        text = f.read()
    fences = list(_FENCE.finditer(text))
    outside = [(0, len(text))]
    for m in fences:  # a '# comment' inside a code block is not a heading
        s, e = outside.pop()
        outside += [(s, m.start()), (m.end(), e)]
    headings = [(h.start(), h.group(1).strip()) for s, e in outside
                for h in _HEADING.finditer(text, s, e)]
    blocks, counts = {}, {}
    for m in fences:
        if m.group(1) != "python":
            continue
        above = [h for pos, h in headings if pos < m.start()]
        heading = above[-1] if above else ""
        i = counts.get(heading, 0)
        counts[heading] = i + 1
        blocks[(heading, i)] = m.group(2)
    return blocks


def block(relpath, heading, index=0):
    blocks = python_blocks(relpath)
    key = (heading, index)
    assert key in blocks, f"{relpath}: no python block #{index} under {heading!r}; found {sorted(blocks)}"
    return blocks[key]


def run_block(relpath, heading, index=0, **user_data):
    """exec the block as written, with only the user's data predefined; returns its namespace."""
    code = block(relpath, heading, index)
    ns = {"__name__": "doc_block", **user_data}
    exec(compile(code, f"{relpath}#{heading}#{index}", "exec"), ns)
    return ns


# ---- the user's data, small ---------------------------------------------------------------

def mnist_cnn():
    """The CNN the README and docs/local.md slice into stages (named `model` there)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 14 * 14, 10))


def images(n=6):
    return torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))


# ---- README.md ------------------------------------------------------------------------------

def test_build_info_doctest():
    """The `>>> import pypaper; pypaper.build_info()` example: each key it shows is there, with a
    value of the type shown (the values themselves are the machine's)."""
    code = block("README.md", "## Install options")
    examples = doctest.DocTestParser().get_examples(code)
    assert len(examples) == 1, "the build_info example is one >>> line"
    ex = examples[0]
    ns = {}
    *stmts, last = ex.source.strip().split(";")
    exec(";".join(stmts), ns)
    info = eval(last, ns)
    shown = dict(re.findall(r"'(\w+)': ('[^']*'|True|False|\d+)", ex.want))
    assert shown, ex.want
    for key, val in shown.items():
        assert key in info, f"build_info() has no {key!r}"
        want_type = str if val.startswith("'") else bool if val in ("True", "False") else int
        assert type(info[key]) is want_type, (key, info[key])
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_readme_quant_block():
    ns = run_block("README.md", "### pypaper.quant")
    from pypaper.quant import QuantizedTensor
    q, w = ns["q"], ns["w"]
    assert isinstance(q, QuantizedTensor)                # "packed uint8 codes + scales"
    assert q.data.dtype == torch.uint8 and q.data.numel() == w.numel() // 2  # 4 bits: 2 per byte
    assert q.scale.shape == (w.shape[0], w.shape[1] // 128)                  # one per group of 128
    assert ns["w_hat"].dtype == torch.float32 and ns["w_hat"].shape == ns["w"].shape
    assert ns["y"].shape == ns["w"].shape


def _comment_after(code, marker):
    """The comment on the line holding `marker` plus the comment-only lines that continue it."""
    lines = code.splitlines()
    i = next(j for j, line in enumerate(lines) if marker in line)
    parts = [lines[i].split("#", 1)[1]]
    for line in lines[i + 1:]:
        if not line.lstrip().startswith("#"):
            break
        parts.append(line.split("#", 1)[1])
    return " ".join(p.strip() for p in parts)


def test_readme_fewbit_block():
    heading = "### pypaper.quant.fewbit"
    ns = run_block("README.md", heading)
    fb = ns["fb"]
    assert type(ns["model"][1]) is nn.GELU              # converted, then reverted
    assert isinstance(ns["act"], fb.GELU)
    # the repr its comment shows is what prints
    shown = _comment_after(block("README.md", heading), 'fb.approximation("gelu", 2)')
    assert re.sub(r"\s+", " ", shown) == repr(fb.approximation("gelu", 2))


def test_readme_wtacrs_block():
    import pypaper.wtacrs as wc
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    ns = run_block("README.md", "### pypaper.wtacrs", model=model, x=x, batch_ids=torch.arange(8))
    assert isinstance(ns["layer"], wc.WTACRSLinear)
    assert isinstance(model[0], wc.WTACRSLinear) and isinstance(model[2], wc.WTACRSLinear)
    ns["loss"].backward()
    assert model[0].weight.grad.shape == (32, 16)


def _linears(m):
    return [type(c).__name__ for c in m.modules() if c is not m and not isinstance(c, nn.ReLU)]


def test_readme_quantize_block():
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(16, 256), torch.randint(0, 10, (16,))
    ns = run_block("README.md", "### pypaper.quant: quantized models (`quantize_`)",
                   model=model, loss_fn=nn.functional.cross_entropy, x=x, y=y)
    assert _linears(ns["w8a8"]) == ["Int8DynamicLinear"] * 2
    assert _linears(ns["int4"]) == ["Int4WeightOnlyLinear"] * 2
    assert _linears(ns["nupes"]) == ["PowerQuantLinear"] * 2
    assert _linears(ns["hawq"]) == ["PowerQuantLinear"] * 2 and set(ns["res"].mapping) == {"0", "2"}
    assert _linears(ns["rules"]) == ["Int8WeightOnlyLinear"] * 2
    assert _linears(model) == ["Linear"] * 2             # the float model is left as it was
    for q in ("w8a8", "int4", "nupes", "hawq", "rules"):
        assert ns[q](x).shape == (16, 10)
    assert type(ns["layer"]).__name__ == "BitLinear"


def test_readme_hopfield_block():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)
    ns = run_block("README.md", "### pypaper.hopfield", q=q, k=k, v=v)
    assert ns["out"].shape == (2, 4, 5, 6)
    assert ns["pool"](torch.randn(3, 9, 64)).shape == (3, 64)


def test_readme_local_block():
    x, y = images()
    ns = run_block("README.md", "### pypaper.local", x=x, y=y, x_train=x,
                   x_pos=torch.rand(6, 784), x_neg=torch.rand(6, 784))
    assert ns["loss"].dim() == 0 and ns["h_pos"].shape == (6, 500)
    assert ns["losses"].shape == (3,) and torch.isfinite(ns["losses"]).all()
    net, model = ns["net"], ns["model"]
    net.eval()                                           # "in eval mode net(x) equals model(x)"
    torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)


def test_readme_torch_func_block():
    ns = run_block("README.md", "## torch.func and forward-mode AD")
    g = ns["per_sample"]
    assert g["0.weight"].shape == (4, 8, 6) and g["0.bias"].shape == (4, 8)


# ---- docs/hopfield.md ---------------------------------------------------------------------

def test_docs_hopfield_block():
    x = torch.randn(2, 7, 256)                           # [N, L, 256], self-association: S = L
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -1] = True                                    # [N, S]; [B, S] for the op (S = 7 there)
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[0, 1] = True                                    # [L, S]
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 6)
    bool_mask = torch.zeros(5, 7, dtype=torch.bool)
    bool_mask[0, 0] = True
    ns = run_block("docs/hopfield.md", "# Modern Hopfield layers: `pypaper.hopfield` (issue #4)",
                   x=x, pad=pad, mask=mask, q=q, k=k, v=v, bool_mask=bool_mask,
                   state=torch.randn(8), stored=torch.randn(7, 8), beta=1.0)
    hop = ns["hop"]
    assert ns["y"].shape == (2, 7, 256)
    assert ns["P"].shape == (2, 4, 7, 7)                 # [N, H, L, S]
    assert ns["out"].shape == (2, 4, 5, 6)
    assert ns["pool"](torch.randn(3, 9, 64)).shape == (3, 64)      # [N, S, 64] -> [N, 64]
    assert ns["lookup"](torch.randn(3, 9, 30)).shape == (3, 9, 30)
    # "or hop((stored, state, projection))"; "bool / uint8 / float masks"
    torch.testing.assert_close(hop((x, x, x)), hop(x), rtol=0, atol=0)
    y_u8 = hop(x, stored_pattern_padding_mask=pad.to(torch.uint8), association_mask=mask.to(torch.uint8))
    y_add = hop(x, stored_pattern_padding_mask=pad,
                association_mask=torch.zeros(7, 7).masked_fill(mask, float("-inf")))
    torch.testing.assert_close(y_u8, ns["y"], rtol=0, atol=0)
    torch.testing.assert_close(y_add, ns["y"], rtol=0, atol=0)


# ---- docs/local.md ------------------------------------------------------------------------

def test_docs_local_first_block():
    x, y = images()
    model = mnist_cnn()
    ns = run_block("docs/local.md", "# Local losses: `pypaper.local` (issue #6)", x=x, y=y,
                   model=model, x_pos=torch.rand(6, 784), x_neg=torch.rand(6, 784))
    assert ns["h"].shape == (6, 500) and ns["h_pos"].shape == (6, 500)
    assert ns["losses"].shape == (3,) and torch.isfinite(ns["losses"]).all()
    assert ns["ff"].weight.grad is not None              # ".grad accumulated"


def test_docs_local_stages_block():
    x, _ = images()
    ns = run_block("docs/local.md", "## Update 3: wrapping real models, mixed precision, edge cases", x=x)
    net, model = ns["net"], ns["model"]
    # the next paragraph: the last stage outputs [N, 10], so in eval mode net(x) equals model(x)
    net.eval()
    torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)


# ---- docs/quant_models.md -----------------------------------------------------------------

def test_docs_quantize_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                          # the block saves "q.pt" in the cwd
    from pypaper.quant import Int8DynamicConfig, quantize_
    ns = run_block("docs/quant_models.md", "## Quantized linear layers and `quantize_`")
    model = ns["model"]
    assert _linears(model) == ["Int8DynamicLinear"] * 2 and ns["y"].shape == (32, 10)
    # "integer codes + scales; load_state_dict works"
    fresh = quantize_(nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)),
                      Int8DynamicConfig())
    fresh.load_state_dict(torch.load("q.pt"))
    x = torch.randn(3, 1024)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert model(torch.randn(2, 3, 1024, dtype=torch.bfloat16)).shape == (2, 3, 10)  # any dtype, leading dims


def test_docs_power_hawq_bitlinear_block():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    w = torch.randn(8, 16)
    ns = run_block("docs/quant_models.md",
                   "## Power-exponent quantization (NUPES / PowerQuant), HAWQ, bit-wise training",
                   model=model, x=x, y=y, w=w, calib_batches=[torch.randn(16, 64) for _ in range(2)])
    assert _linears(model) == ["Linear"] * 2             # each alternative quantized a copy
    for name in ("searched", "fixed", "nupes", "hawq"):
        assert _linears(ns[name]) == ["PowerQuantLinear"] * 2
    assert all(not m.learnable for m in ns["nupes"].modules() if hasattr(m, "learnable"))  # frozen
    assert abs(float(ns["fixed"][0].exponent) - 0.7) < 1e-6
    assert ns["codes"].dtype == torch.int8 and ns["w_hat"].shape == w.shape
    assert type(ns["layer"]).__name__ == "BitLinear"


# ---- every block is accounted for ---------------------------------------------------------

CASES = {
    ("README.md", "## Install options", 0),
    ("README.md", "### pypaper.quant", 0),
    ("README.md", "### pypaper.quant.fewbit", 0),
    ("README.md", "### pypaper.wtacrs", 0),
    ("README.md", "### pypaper.quant: quantized models (`quantize_`)", 0),
    ("README.md", "### pypaper.hopfield", 0),
    ("README.md", "### pypaper.local", 0),
    ("README.md", "## torch.func and forward-mode AD", 0),
    ("docs/hopfield.md", "# Modern Hopfield layers: `pypaper.hopfield` (issue #4)", 0),
    ("docs/local.md", "# Local losses: `pypaper.local` (issue #6)", 0),
    ("docs/local.md", "## Update 3: wrapping real models, mixed precision, edge cases", 0),
    ("docs/quant_models.md", "## Quantized linear layers and `quantize_`", 0),
    ("docs/quant_models.md",
     "## Power-exponent quantization (NUPES / PowerQuant), HAWQ, bit-wise training", 0),
}
COVERED_ELSEWHERE = {
    ("README.md", "### pypaper.snn", 0): "tests/snn/test_readme_claims_s35.py",
}


def test_every_python_block_has_a_case():
    found = {(f, h, i) for f in DOC_FILES for (h, i) in python_blocks(f)}
    missing = found - CASES - set(COVERED_ELSEWHERE)
    assert not missing, f"python blocks without a case in {__file__}: {sorted(missing)}"
    gone = (CASES | set(COVERED_ELSEWHERE)) - found
    assert not gone, f"cases whose block is no longer there (heading renamed?): {sorted(gone)}"
