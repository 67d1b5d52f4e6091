"""The LLM reward model as a Ray Serve deployment: the same mechanism as the control
workload's (`rlhf_ray.serve_rm`): concurrent callers merged by `@serve.batch` into one
forward pass, weights swapped in place when the reward trainer publishes a newer version,
the version behind every score returned with it.

Python callers use the handle: `handle.score.remote(prompts, responses)`. Outside callers POST
JSON `{"prompts": [...], "responses": [...]}` to `<route>/score` and get `{"scores", "version"}`.
"""

from __future__ import annotations

import os
import time

import torch
from ray import serve

DEPLOYMENT_NAME = "LMRewardModel"


class LMRewardServer:
    def __init__(self, model_path: str, weight_store: str, namespace: str,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01,
                 torch_threads: int = 1, max_prompt_tokens: int = 64,
                 max_response_tokens: int = 64, dtype: str = "float32"):
        import ray

        from rlhf_ray.llm.modeling import load_scalar_model, load_tokenizer

        torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = load_tokenizer(model_path)
        self.model = load_scalar_model(model_path, dtype, self.device).eval()
        self.max_prompt, self.max_response = max_prompt_tokens, max_response_tokens
        self.version = 0
        self.store = ray.get_actor(weight_store, namespace=namespace) if weight_store else None
        self.batch_sizes: list[int] = []
        self.started_at = time.time()
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _refresh(self) -> None:
        if self.store is None:
            return
        new = await self.store.get_if_newer.remote(self.version)
        if new is not None:
            version, weights = new
            self.model.load_state_dict(weights)
            self.version = version

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[tuple[list[str], list[str]]]) -> list[dict]:
        from rlhf_ray.llm.modeling import encode_pairs, last_token_scores

        await self._refresh()
        self.batch_sizes.append(len(requests))
        prompts = [p for ps, _ in requests for p in ps]
        responses = [r for _, rs in requests for r in rs]
        b = encode_pairs(self.tok, prompts, responses, self.max_prompt,
                         self.max_response).to(self.device)
        with torch.no_grad():
            scores = last_token_scores(self.model, b.input_ids, b.attention_mask,
                                       b.position_ids).cpu().numpy()
        out, start = [], 0
        for ps, _ in requests:
            out.append({"scores": scores[start:start + len(ps)], "version": self.version})
            start += len(ps)
        return out

    async def score(self, prompts: list[str], responses: list[str]) -> dict:
        """Scores of (prompt, response) pairs: {scores [n], version}."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return {"scores": [], "version": self.version}
        return await self._score_batch((list(prompts), list(responses)))

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
        except Exception as exc:  # malformed input: a client error, not a 500
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=422)
        res = await self.score(prompts, responses)
        return {"scores": [float(s) for s in res["scores"]], "version": res["version"]}

    def info(self) -> dict:
        return {"version": self.version, "pid": os.getpid(), "batch_sizes": list(self.batch_sizes),
                "started_at": self.started_at}


def deploy(model_path: str, *, app_name: str, weight_store: str, namespace: str, serve_cfg,
           torch_threads: int = 1, max_prompt_tokens: int = 64, max_response_tokens: int = 64,
           route_prefix: str | None = None, wait: bool = True):
    """Start the LM reward-model application; resources and batching come from the config.
    `wait=False` returns at once (the replica starts while the caller starts other roles);
    `roles.wait_running(app_name)` then waits for it."""
    opts = {"num_cpus": serve_cfg.num_cpus, "num_gpus": serve_cfg.num_gpus}
    if serve_cfg.resources:
        opts["resources"] = dict(serve_cfg.resources)
    dep = serve.deployment(LMRewardServer, name=DEPLOYMENT_NAME).options(
        num_replicas=serve_cfg.num_replicas,
        max_ongoing_requests=serve_cfg.max_ongoing_requests,
        max_queued_requests=serve_cfg.max_queued_requests,
        ray_actor_options=opts,
    )
    app = dep.bind(model_path, weight_store, namespace, serve_cfg.max_batch_size,
                   serve_cfg.batch_wait_timeout_s, torch_threads, max_prompt_tokens,
                   max_response_tokens)
    from rlhf_ray.roles import run_app

    return run_app(app, app_name, route_prefix or f"/{app_name}", wait)


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
    dep = serve.deployment(LMRewardServer, name=DEPLOYMENT_NAME).options(
        num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)),
                           "num_gpus": float(args.get("num_gpus", 0))},
    )
    return dep.bind(path, "", "", int(args.get("max_batch_size", 16)),
                    float(args.get("batch_wait_timeout_s", 0.01)),
                    int(args.get("torch_threads", 1)), int(args.get("max_prompt_tokens", 64)),
                    int(args.get("max_response_tokens", 64)))
