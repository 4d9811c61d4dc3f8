"""The GRPO objective, piece by piece: group-normalised advantages, the clipped surrogate, the KL
estimator, and the per-token loss summed over one optimizer step's completion tokens.

For a prompt, G completions y_1..y_G are sampled from the policy and scored r_1..r_G. Then, per
completion token t of completion i (Shao et al. 2024, DeepSeekMath, eq. 3; conventions and
defaults of TRL 1.16's GRPOTrainer, so numbers compare):

    A_i     = (r_i - mean(r)) / (std(r) + 1e-4)          within the group; std with Bessel's correction
                                                          (scale=False: r_i - mean(r), Dr. GRPO)
    rho_t   = exp(logp_t - logp_old_t)                    logp_old: the policy that sampled, detached
    clip_t  = -min(rho_t A_i, clamp(rho_t, 1 - eps_low, 1 + eps_high) A_i)
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  Schulman's k3 estimator of KL(policy || ref), >= 0
    loss_t  = clip_t + beta * rho_t * kl_t                (rho_t * kl_t: TRL's use_bias_correction_kl, on
                                                          by default: the unbiased reverse-KL gradient)
    loss    = sum over every completion token of the step / (completion tokens in the step)

The last line is TRL's loss_type="dapo": every token weighs the same, whatever its completion's
length and whichever micro-batch it is in, so a step split into micro-batches (gradient
accumulation) gives the gradients of the whole step at once. With one update per rollout
(num_iterations=1) logp_old is logp itself, detached: rho = 1 in value and the clip never bites;
its gradient is the plain policy gradient A_i * grad logp_t. The clip matters from the second
update on the same rollout.

Everything here works on (rows, positions) tensors in the layout of
gemmatune.training.loss.token_logprobs: position t holds log p(token t+1), 0 where there is no
completion token. Precision: fp32 throughout (token_logprobs returns fp32).
"""
import torch

ADVANTAGE_EPS = 1e-4  # TRL's: keeps a group of near-equal rewards from blowing up


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i of each completion (N,) from its reward (N,), N = prompts x group_size, grouped by
    prompt in consecutive runs of group_size. A group whose rewards are all equal gets zeros:
    it says nothing about which completion was better."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (prompts * {group_size},), got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return centred.reshape(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - logp.
    Non-negative, 0 where the two agree, unbiased for the KL when tokens come from the policy."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(rho A, clamp(rho, 1 - eps_low, 1 + eps_high) A), rho) per token; advantages (rows,)
    broadcast over positions."""
    ratio = torch.exp(logp - old_logp)
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def grpo_loss(logp: torch.Tensor, completion_mask: torch.Tensor, advantages: torch.Tensor, normalizer,
              old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              kl_ratio_correction: bool = True) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch (see the module docstring), and its statistics.

    Args:
        logp: (rows, positions) log-probabilities of the sampled tokens under the policy (with grad).
        completion_mask: (rows, positions) bool, True on completion tokens.
        advantages: (rows,) A_i of each completion.
        normalizer: completion tokens of the whole optimizer step (all micro-batches).
        old_logp: the sampling policy's log-probabilities; None: logp detached (the first update).
        ref_logp: the reference policy's; needed when beta > 0.
        beta: KL coefficient. epsilon_low / epsilon_high: the clip range.
        kl_ratio_correction: multiply kl_t by rho_t (TRL's default).

    Returns:
        (loss, stats): loss is this micro-batch's share of the step's loss (sum / normalizer);
        stats holds detached sums over its completion tokens: "kl" (sum of kl_t, 0 when beta is 0
        and no reference is given), "clipped" (tokens where the clip was active), "tokens".
    """
    mask = completion_mask.to(logp.dtype)
    old_logp = logp.detach() if old_logp is None else old_logp
    per_token, ratio = clipped_surrogate(logp, old_logp, advantages.to(logp.dtype), epsilon_low, epsilon_high)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp)
        if beta:
            per_token = per_token + beta * (ratio * kl if kl_ratio_correction else kl)
    elif beta:
        raise ValueError("beta > 0 needs the reference policy's log-probabilities (ref_logp)")
    loss = (per_token * mask).sum() / normalizer
    a = advantages[:, None].to(logp.dtype)
    clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    stats = {"kl": (kl.detach() * mask).sum(), "clipped": (clipped & completion_mask).sum().to(logp.dtype),
             "tokens": mask.sum()}
    return loss, stats
