"""Thin adapters from models to :class:`~kronsum.KronSum` blocks and back.

Each adapter lives in its own module and imports its framework only there, so
``import kronsum`` never needs PyTorch or JAX:

``kronsum.adapters.torch``  (extra ``torch``) forward/backward hooks on ``nn.Linear`` and
                            ``nn.Conv2d``: :func:`~kronsum.adapters.torch.collect` returns
                            ``{layer name: KronSum}``; :func:`~kronsum.adapters.torch.precondition`
                            replaces the layers' gradients by preconditioned ones.
``kronsum.adapters.jax``    (extra ``jax``) the same statistics for a plain-JAX model whose
                            dense and conv layers are written through a small ``tape``.

Both follow the library's conventions: row-major vec, gradient-side ⊗ activation-side for a
weight stored ``(out, in)`` (a conv weight viewed as ``(out, in·kh·kw)``), the bias as an
extra last input column, and ``F`` a *sum* whose weights carry the loss's reduction.
See ``docs/adapters.md``.
"""

__all__: list[str] = []
