import os

# Triton's interpreter must be on before triton is first imported: the kernels then run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
