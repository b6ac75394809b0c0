"""The op modules of nova_kernels, one file per op: its Triton kernels, launchers, torch path
and autograd.Function. `nova_kernels.<op>` is the op's function; `nova_kernels.ops.<op>` is
its module (tests reach workspace bounds and kernels there). Nothing is imported here, so
each attribute of this package is a module, never shadowed by a function of its name."""
