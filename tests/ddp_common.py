"""Shared by the torchrun workers of test_ddp.py (imported from the tests folder, which torchrun
puts first on the path)."""

from pathlib import Path

from safetensors.torch import save_file

from labelwise.engine import trainer as trainer_module


def save_weights_after_fit(out: Path) -> None:
    """Make every ``Trainer.fit`` of this process save the trained module's weights to
    ``out/rank<R>.safetensors`` (for workers that train through a regime's own entry point)."""
    fit = trainer_module.Trainer.fit

    def fit_and_save(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        result = fit(self, *args, **kwargs)
        state = {k: v.contiguous() for k, v in self.bare_model.state_dict().items()}
        save_file(state, str(out / f"rank{self.dist.rank}.safetensors"))
        return result

    trainer_module.Trainer.fit = fit_and_save
