"""Run the Triton masked-step kernel through TRITON_INTERPRET=1 against the reference.

Run as a subprocess (the interpreter must be chosen before triton is imported). Prints one
JSON object: {case_name: {"p_err", "state_err", "energy_ref", "energy", "changed_ref",
"changed", "bf16_ulps"}}.
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernel_cases  # noqa: E402

from metabolic.kernels.reference import reference_step  # noqa: E402
from metabolic.kernels.triton_step import triton_step  # noqa: E402

N = 20_003  # not a multiple of BLOCK or block_size: exercises the masked tail
LARGE_N = 1_000_003


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (the interpreter truncates, GPUs round)."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    return int((ia - ib).abs().max())


def main() -> None:
    out = {}
    cases = [(c, N) for c in kernel_cases.all_cases()]
    # topk on a buffer ~60x the sample, so each sampled position is picked from a wide stratum
    # by the kernel's own hash: a mismatch with threshold.sample_indices moves the threshold
    cases += [((kind, "topk", 1.0, False, 1.0, 0.0), LARGE_N) for kind in ("adamw", "sgd")]
    for (kind, rule, alpha, residual, decay, count_price), n in cases:
        spec = kernel_cases.make_spec(kind, rule, alpha, residual, residual_decay=decay,
                                      count_price=count_price)
        p, g, st = kernel_cases.make_case(kind, residual, n)
        p2, st2 = p.clone(), {k: v.clone() for k, v in st.items()}
        bf_ref = torch.empty(n, dtype=torch.bfloat16)
        bf = torch.empty(n, dtype=torch.bfloat16)
        e1, c1 = reference_step(p, g, st, spec, out_bf16=bf_ref)
        e2, c2 = triton_step(p2, g, st2, spec, out_bf16=bf, block=4096)
        key = kernel_cases.case_key(kind, rule, alpha, residual, decay, count_price)
        out[key if n == N else f"{key}_n{n}"] = {
            "p_err": float((p - p2).abs().max()),
            "state_err": max(float((st[k] - st2[k]).abs().max()) for k in st),
            "energy_ref": e1, "energy": float(e2), "changed_ref": c1, "changed": int(c2),
            "bf16_ulps": bf16_ulps(bf_ref, bf)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
