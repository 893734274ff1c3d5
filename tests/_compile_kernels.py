"""Compile every Triton kernel of ``kernels`` for real NVIDIA targets (sm_80, sm_90) without a GPU.

Run as a script with TRITON_INTERPRET unset (under the interpreter ``@triton.jit`` yields interpreted
functions). Prints one line per compiled variant and exits non-zero on the first failure.
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels._gather as G  # noqa: E402
import kernels.permute as P  # noqa: E402

I32 = "i32"
VARIANTS = []
for e_pow2 in (8, 64, 256):
    VARIANTS.append(
        (
            P._block_hist_kernel,
            {"ids_ptr": "*i32", "cnt_ptr": "*i32", "TK": I32, "E": I32},
            {"BLOCK": 128, "E_POW2": e_pow2},
        )
    )
VARIANTS.append(
    (
        P._block_rank_kernel,
        {"ids_ptr": "*i32", "base_ptr": "*i32", "row_map_ptr": "*i32", "TK": I32, "E": I32},
        {"BLOCK": 128},
    )
)
for dt in ("bf16", "fp16", "fp32"):
    rows_sig = {
        "src_ptr": f"*{dt}",
        "dst_ptr": f"*{dt}",
        "row_map_ptr": "*i32",
        "w_ptr": f"*{dt}",
        "T": I32,
        "H": I32,
        "src_stride": I32,
        "dst_stride": I32,
    }
    for has_w in (False, True):
        VARIANTS.append((P._scatter_rows_kernel, rows_sig, {"K": 8, "HAS_W": has_w, "BLOCK_T": 4, "BLOCK_H": 1024}))
        VARIANTS.append((P._gather_sum_kernel, rows_sig, {"K": 8, "HAS_W": has_w, "BLOCK_T": 4, "BLOCK_H": 1024}))
    VARIANTS.append(
        (
            P._row_dot_kernel,
            {
                "g_ptr": f"*{dt}",
                "src_ptr": f"*{dt}",
                "row_map_ptr": "*i32",
                "out_ptr": "*fp32",
                "T": I32,
                "H": I32,
                "g_stride": I32,
                "src_stride": I32,
            },
            {"K": 2, "N_HBLOCKS": 4, "BLOCK_T": 1, "BLOCK_H": 1024},
        )
    )
for bits in ("i16", "i32"):
    VARIANTS.append(
        (
            G._gather_rows_kernel,
            {
                "src_ptr": f"*{bits}",
                "dst_ptr": f"*{bits}",
                "idx_ptr": "*i64",
                "S": I32,
                "R": I32,
                "H": I32,
                "n_rows": I32,
                "stride_sb": "i64",
                "stride_ss": "i64",
                "stride_sh": "i64",
                "n_hblocks": I32,
            },
            {"BLOCK_R": 4, "BLOCK_H": 1024},
        )
    )


def main() -> int:
    for arch in (80, 90):
        for fn, sig, consts in VARIANTS:
            signature = {**sig, **dict.fromkeys(consts, "constexpr")}
            try:
                k = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32)
                )
            except Exception as exc:  # noqa: BLE001
                print(f"FAILED sm_{arch} {fn.__name__} {consts}: {exc}")
                return 1
            print(f"ok sm_{arch} {fn.__name__} {consts} cubin={len(k.asm['cubin'])}B")
    print(f"compiled {2 * len(VARIANTS)} variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
