"""``from myopia.hf import make_myopic``: the import the README shows. The code is
:mod:`myopia.models.hf.myopic`."""

from myopia.models.hf.myopic import attention_modules, current_cut, make_myopic, myopia_attention_forward

__all__ = ["attention_modules", "current_cut", "make_myopic", "myopia_attention_forward"]
