"""Pure Triton kernels of kl-nontarget, installed as `kl_nontarget.kernels`.

Nothing here knows about autograd or models: `kl_nontarget.triton_impl` allocates the outputs and launches them.
"""
