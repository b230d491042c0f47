"""Resumable state: one shape and one check for every stage that can be interrupted.

Every resumable state file is a dict that carries `kind` (whose state it is), `format_version`
and the settings the interrupted run was made with:

| stage | file | kind | settings at |
|---|---|---|---|
| pre-training | run_dir/latest.ckpt | "policy" (a policy checkpoint) | train_state["args"] |
| fine-tuning | run_dir/latest.ckpt | "policy" (a policy checkpoint) | train_state["config"] |
| reward model | run_dir/latest.pt | "reward_fit_state" | settings |
| collection | run_dir/partial.pt (partial_rank<r>.pt) | "collection_partial" | settings |

`check_resumable` refuses, in one line that says what to do, a file of another kind or format
version, and a run whose settings differ from the saved ones (but for those it may change, such
as the learning rate a diverged run is advised to lower).
"""

from diffusion_policy.common.runtime import UserError

STATE_FORMAT = 1  # the format_version of the state files written here (policy checkpoints keep their own)


def plain_values(value):
    """Tuples to lists, recursively: how settings are stored in and compared against a saved state."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain_values(v) for v in value]
    return value


def flat_settings(settings, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}, tuples as lists: settings as they are compared on resume."""
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = plain_values(v)
    return out


def resumable_state(kind, settings, **payload):
    """The dict a stage saves to resume from: its kind, the format version, its settings and payload."""
    return {"kind": kind, "format_version": STATE_FORMAT, "settings": plain_values(settings), **payload}


def check_resumable(path, state, kind, settings, may_change=(), saved_settings=None, format_version=STATE_FORMAT):
    """Refuse to resume from `state` (loaded from `path`) unless it is a `kind` state of this format
    whose saved settings equal `settings` ({name: value}, nested dicts allowed) but for names whose
    last part is in `may_change`. `saved_settings`: where the saved ones are, if not state["settings"]."""
    found = state.get("kind") if isinstance(state, dict) else type(state).__name__
    if found != kind:
        raise UserError(f"cannot resume: {path} is not a {kind} state (it holds {found!r}); run without --resume "
                        "to start afresh")
    if state.get("format_version") != format_version:
        raise UserError(f"cannot resume: {path} has format_version {state.get('format_version')} and this code "
                        f"resumes version {format_version}; run without --resume to start afresh")
    saved = flat_settings(state["settings"] if saved_settings is None else saved_settings)
    now = flat_settings(settings)
    changed = {k: (saved.get(k), v) for k, v in now.items()
               if saved.get(k) != v and k.split(".")[-1] not in may_change}
    if changed:
        raise UserError(f"cannot resume {path} with other settings (saved, now): {changed}")
    return state
