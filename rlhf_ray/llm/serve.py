"""The LLM reward model as a Ray Serve deployment: the mechanism both workloads share
(`rlhf_ray.scoring`): concurrent callers merged by `@serve.batch` into one
forward pass, weights swapped in place when the reward trainer publishes a newer version,
the version behind every score returned with it.

Python callers use the handle: `handle.score.remote(prompts, responses)`. Outside callers POST
JSON `{"prompts": [...], "responses": [...]}` to `<route>/score` and get `{"scores", "version"}`.
Either may say which responses were cut at a length limit before they ended (`finished`, one
boolean each; default all ended): those are scored without the EOS a finished one gets.
"""

from __future__ import annotations

import torch

from rlhf_ray.llm.modeling import (
    encode_pairs,
    last_token_scores,
    load_scalar_model,
    load_tokenizer,
)
from rlhf_ray.runtime.devices import actor_device, placed_device
from rlhf_ray.runtime.scoring import VersionedScorer, standalone
from rlhf_ray.runtime.scoring import deploy as _deploy

DEPLOYMENT_NAME = "LMRewardModel"


class LMRewardServer(VersionedScorer):
    def __init__(self, model_path: str, weight_store: str, namespace: str,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01,
                 torch_threads: int = 1, max_prompt_tokens: int = 64,
                 max_response_tokens: int = 64, dtype: str = "float32",
                 device: str | None = None):
        torch.set_num_threads(torch_threads)
        self.device = actor_device(device, "the reward-model server")
        self.tok = load_tokenizer(model_path)
        self.model = load_scalar_model(model_path, dtype, self.device).eval()
        self.max_prompt, self.max_response = max_prompt_tokens, max_response_tokens
        super().__init__(weight_store, namespace, max_batch_size, batch_wait_timeout_s)

    def load(self, weights) -> None:
        """Published weights: all, or the trainable part (the rest never changes)."""
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or (missing and len(weights) == len(self.model.state_dict())):
            raise ValueError(f"reward-model weights: unexpected {unexpected[:3]}, "
                             f"missing {missing[:3]}")

    def forward(self, requests: list[tuple[list[str], list[str], list[bool]]]) -> list[dict]:
        prompts = [p for ps, _, _ in requests for p in ps]
        responses = [r for _, rs, _ in requests for r in rs]
        finished = [f for _, _, fs in requests for f in fs]
        b = encode_pairs(self.tok, prompts, responses, self.max_prompt,
                         self.max_response, finished=finished).to(self.device)
        with torch.no_grad():
            scores = last_token_scores(self.model, b.input_ids, b.attention_mask,
                                       b.position_ids).cpu().numpy()
        out, start = [], 0
        for ps, _, _ in requests:
            out.append({"scores": scores[start:start + len(ps)], "version": self.version})
            start += len(ps)
        return out

    async def score(self, prompts: list[str], responses: list[str],
                    version: int | None = None, finished: list[bool] | None = None) -> dict:
        """Scores of (prompt, response) pairs: {scores [n], version}; `version`: pin it;
        `finished`: whether each response ended (with EOS) or was cut at the policy's length
        limit (None: all ended, as written text does)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if finished is not None and len(finished) != len(responses):
            raise ValueError(f"{len(finished)} finished flags but {len(responses)} responses")
        if not prompts:
            return {"scores": [], "version": self.version}
        flags = [True] * len(prompts) if finished is None else [bool(f) for f in finished]
        return await self._score((list(prompts), list(responses), flags), version, len(prompts))

    async def __call__(self, request) -> dict:
        from starlette.responses import JSONResponse

        if not request.url.path.rstrip("/").endswith("/score") or request.method != "POST":
            return JSONResponse({"error": "POST JSON {prompts, responses} to /score"},
                                status_code=404)
        try:
            body = await request.json()
            prompts, responses = body["prompts"], body["responses"]
            if not (isinstance(prompts, list) and isinstance(responses, list)
                    and all(isinstance(x, str) for x in prompts + responses)):
                raise ValueError("prompts and responses must be lists of strings")
            if len(prompts) != len(responses):
                raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
            finished = body.get("finished")  # optional: which responses ended (EOS)
            if finished is not None and not (isinstance(finished, list) and len(finished) ==
                                             len(responses) and all(isinstance(f, bool)
                                                                    for f in finished)):
                raise ValueError("finished must be a list of booleans, one per response")
        except Exception as exc:  # malformed input: a client error, not a 500
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=422)
        res = await self.score(prompts, responses, finished=finished)
        return {"scores": [float(s) for s in res["scores"]], "version": res["version"]}


def deploy(model_path: str, *, app_name: str, weight_store: str, namespace: str, serve_cfg,
           torch_threads: int = 1, max_prompt_tokens: int = 64, max_response_tokens: int = 64,
           route_prefix: str | None = None, wait: bool = True, dtype: str = "float32"):
    """Start the LM reward-model application; resources and batching come from the config.
    `wait=False` returns at once (the replica starts while the caller starts other roles);
    `runtime.serving.wait_running(app_name)` then waits for it."""
    return _deploy(LMRewardServer, DEPLOYMENT_NAME,
                   (model_path, weight_store, namespace, serve_cfg.max_batch_size,
                    serve_cfg.batch_wait_timeout_s, torch_threads, max_prompt_tokens,
                    max_response_tokens, dtype, placed_device(serve_cfg)),
                   app_name=app_name, serve_cfg=serve_cfg, route_prefix=route_prefix, wait=wait)


def app_builder(args: dict):
    """Serve application builder for `serve deploy serve/lm_reward_model.yaml`: a trained
    reward-model folder (a run's `reward_model/` or `final/reward_model/`) served on its own.

    args: `model` (the folder), optional `max_batch_size`, `batch_wait_timeout_s`,
    `num_replicas`, `num_cpus`, `num_gpus`, `torch_threads`, `max_prompt_tokens`,
    `max_response_tokens`.
    """
    path = args.get("model")
    if not path:
        raise ValueError("LM reward-model app: set args.model to a reward-model folder")
    return standalone(LMRewardServer, DEPLOYMENT_NAME, args, (
        path, "", "", int(args.get("max_batch_size", 16)),
        float(args.get("batch_wait_timeout_s", 0.01)), int(args.get("torch_threads", 1)),
        int(args.get("max_prompt_tokens", 64)), int(args.get("max_response_tokens", 64))))
