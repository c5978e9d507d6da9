"""The coefficient of the KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019)."""

from __future__ import annotations


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.kl_coef = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = float(state["kl_coef"])


class AdaptiveKLController(FixedKLController):
    """error = clip(KL / target - 1, -0.2, 0.2);  kl_coef *= 1 + error * n_steps / horizon."""

    def __init__(self, kl_coef: float, target_kl: float, horizon: int):
        super().__init__(kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon


def kl_controller(kl_coef: float, adaptive: bool, target_kl: float, horizon: int) -> FixedKLController:
    return AdaptiveKLController(kl_coef, target_kl, horizon) if adaptive else FixedKLController(kl_coef)
