"""Grouped matmuls over rows sorted by expert: one per backend (``grouped_matmul``) and the
experts' fused SwiGLU (``grouped_swiglu``)."""
