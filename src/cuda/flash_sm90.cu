// flash_attn (flash.cuh) on Hopper's warpgroup MMA: the tensor core reads K and V straight from
// shared memory, and one instruction covers 64 rows, so the warps spend far fewer issue slots on
// the multiplications than with mma.sync. Compiled separately by build.rs for compute_90a (wgmma
// exists nowhere else); samkv loads it only on a device of compute capability 9.0.

#include "flash.cuh"

FLASH_WG(bf16, __nv_bfloat16, 64)
FLASH_WG(bf16, __nv_bfloat16, 128)
FLASH_WG(f16, __half, 64)
FLASH_WG(f16, __half, 128)
