#!/bin/sh
# Compiler launcher of the Hopper kernels (CUDA_COMPILER_LAUNCHER of jax_na_fused_sm90): runs the
# compile command it is given and fails it when ptxas serialized wgmma instructions ("(C751x)
# Potential Performance Loss: wgmma.mma_async instructions are serialized ..."). ptxas prints that
# as `ptxas info`, not as a warning, so a build would pass with every product of a kernel waiting
# for the one before (10-20% slower: cuda/fused/NOTES.md, session 26). Configure with
# -DJAX_NA_ALLOW_WGMMA_SERIALIZATION=ON to build such kernels anyway.
log=$(mktemp "${TMPDIR:-/tmp}/jax_na_ptxas.XXXXXX") || exit 1
"$@" 2>"$log"
rc=$?
cat "$log" >&2
if [ "$rc" -eq 0 ] && grep -q "wgmma.mma_async instructions are serialized" "$log"; then
  echo "error: ptxas serialized the wgmma instructions of a Hopper kernel (ptxas info above);" \
       "see cuda/fused/NOTES.md (C7515) or configure with -DJAX_NA_ALLOW_WGMMA_SERIALIZATION=ON" >&2
  rc=1
fi
rm -f "$log"
exit "$rc"
