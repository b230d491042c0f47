"""Offline study for #23: how much of the noise-space tilt can the noise policy realise?
Collect once: states of the base's rollouts (fine-tuning seeds), M prior noises each, true rewards.
Fit the noise policy on train states with several settings; measure on held-out states the reward of
fresh draws from it against fresh prior draws (common random numbers), as the tilt meter does."""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
torch.set_num_threads(1)
from diffusion_policy.checkpoint import load_policy
from diffusion_policy.rollout import rollout
from diffusion_policy.finetune.sources import SimulatorReward
from diffusion_policy.finetune.noise import tilted_noise_mean
from diffusion_policy.finetune.tilt import tilt_gain_per_state
from diffusion_policy.noise_policy import NoisePolicy, NoisePolicyConfig

policy = load_policy("data/checkpoints/policy_pretrained.ckpt")
src = SimulatorReward(policy)
K = policy.sampler_config.num_inference_steps
T, D = policy.config.pred_horizon, policy.config.action_dim

def states(seeds, n, gen_seed):
    res = rollout(policy, seeds, max_steps=300, generator=torch.Generator().manual_seed(gen_seed), record_calls=True, record_envs=True)
    c = res["calls"]; ep, call = np.nonzero(c["active"])
    pick = np.random.RandomState(gen_seed).permutation(len(ep))[:n]
    return c["obs"][ep[pick], call[pick]], c["env"][ep[pick], call[pick]], c["n_exec"][call[pick]]

def decode_score(obs, envs, n_exec, w):
    """obs (S,..), w (S, M, K, T, D) -> r (S, M)"""
    S, M = w.shape[:2]
    cond = policy.obs_cond(torch.as_tensor(obs, dtype=torch.float32)).repeat_interleave(M, 0)
    ww = w.reshape(S * M, K, T, D)
    full = torch.cat([ww.transpose(0, 1), torch.zeros(1, S * M, T, D)])
    with torch.no_grad():
        x0 = torch.cat([policy.sample(cond[i:i + 2048], noise=full[:, i:i + 2048]) for i in range(0, S * M, 2048)])
    r = src.reward(None, x0, np.repeat(envs, M), np.repeat(n_exec, M))
    return r.view(S, M)

cache = "data/noise_study.pt"
if os.path.exists(cache):
    d = torch.load(cache, weights_only=False)
else:
    t0 = time.time()
    o, e, n = states(list(range(300000, 300000 + 64)), 1024 + 128, 0)
    M = 16
    w = torch.randn((len(o), M, K, T, D), generator=torch.Generator().manual_seed(1))
    r = decode_score(o, e, n, w)
    d = {"obs": o, "envs": e, "n_exec": n, "w": w, "r": r}
    torch.save(d, cache)
    print("collected", len(o), "states", round(time.time() - t0), "s", flush=True)
obs, envs, n_exec, w, r = d["obs"], d["envs"], d["n_exec"], d["w"], d["r"]
tr, te = slice(0, 1024), slice(1024, None)
cond = policy.obs_cond(torch.as_tensor(obs, dtype=torch.float32))
# the held-out measurement: 16 fresh draws per state from prior (common z) and from each fitted policy
Mz = 16
z = torch.randn((128, Mz, K, T, D), generator=torch.Generator().manual_seed(2))
r_prior = d.get("r_prior")
if r_prior is None:
    r_prior = decode_score(obs[te], envs[te], n_exec[te], z); d["r_prior"] = r_prior; torch.save(d, cache)
print("held-out prior reward", float(r_prior.mean()), "predicted tilt (lam 100, 16)", float(tilt_gain_per_state(r_prior, 100).mean()), flush=True)

def fit_and_measure(lam=100.0, m=8, lr=1e-3, steps=2000, hidden=256, bound=1.5, batch=128, wd=0.0, only_first=None, n_train=1024):
    torch.manual_seed(0)
    net = NoisePolicy(NoisePolicyConfig(cond.shape[1], K, T, D, hidden, bound, 1.0))
    tr = slice(0, n_train)
    tgt, p = tilted_noise_mean(w[tr, :m], r[tr, :m], lam)
    if only_first is not None:
        tgt = tgt.clone(); tgt[:, only_first:] = 0
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        loss = ((net(cond[tr][idx]) - tgt[idx]) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        mean = net(cond[te])  # (128, K, T, D)
    rr = decode_score(obs[te], envs[te], n_exec[te], mean[:, None] + z)
    gain = (rr.mean(1) - r_prior.mean(1))
    out = {"lam": lam, "m": m, "lr": lr, "steps": steps, "hidden": hidden, "bound": bound, "wd": wd, "only_first": only_first, "n_train": n_train,
           "realised": float(gain.mean()), "se": float(gain.std() / np.sqrt(len(gain))),
           "train_target_gain": float(((p * r[tr, :m]).sum(1) - r[tr, :m].mean(1)).mean()),
           "mean_rms": float(mean.pow(2).mean().sqrt())}
    print(json.dumps(out), flush=True)
    return out

if __name__ == "__main__":
    for spec in sys.argv[1:]:
        fit_and_measure(**json.loads(spec))
