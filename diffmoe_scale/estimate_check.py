"""The estimator's quantities (estimate.py) counted on real forwards and training steps: what a forward keeps
for backward, what the engine and the trainer hold, and what the collectives send."""
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .config import Config
from .estimate import MODEL_STATE_KINDS
from .models import routing_tape


@contextmanager
def counting_kept_tensors(exclude):
    """Yields {storage address: bytes} of what the forward inside keeps for backward, each storage once:
    the tensors autograd saves (saved-tensor hooks) and the routing decisions checkpointed blocks keep
    for their recomputation (models/routing_tape.py), less the storages of `exclude` (parameters,
    buffers). Kept tensors stay alive until backward, so two of them share an address only if they
    share the storage."""
    skip = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    kept = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()  # a saved output would hold its own grad_fn: a cycle that is never freed

    record = routing_tape.record

    def recording(layer, decision):
        for tensor in _tensors_in(decision):
            keep(tensor)
        record(layer, decision)

    routing_tape.record = recording
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            yield kept
    finally:
        routing_tape.record = record


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple):  # a decision: named tuples of tensors and count lists
        for item in value:
            yield from _tensors_in(item)


def forward_activation_bytes(config: Config, model, micro_batch: int, seed: int = 0) -> int:
    """Bytes one training forward and loss of `model` keep for backward (see `counting_kept_tensors`),
    on a random micro-batch, as the trainer runs them: fp32 diffusion maths around the model's dtype."""
    from .diffusion import build_objective
    from .parallel.precision import CastAtModelBoundary

    param = next(model.parameters())
    generator = torch.Generator(param.device).manual_seed(seed)
    shape = (micro_batch, config.model.in_channels, config.model.input_size, config.model.input_size)
    images = torch.randn(shape, generator=generator, device=param.device)
    labels = torch.randint(0, config.model.num_classes, (micro_batch,), generator=generator, device=param.device)
    objective = build_objective(config)
    noise, t = objective.draw(images.shape, generator)
    with counting_kept_tensors([*model.parameters(), *model.buffers()]) as kept:
        objective.training_losses(CastAtModelBoundary(model.train(), param.dtype), images, labels, noise, t)
    return sum(kept.values())


def _storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of the distinct storages under `tensors`."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _reachable_tensors(root) -> list[torch.Tensor]:
    """Tensors reachable from a DeepSpeed or torch optimizer through attributes, containers and .grad."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
        elif isinstance(obj, dict):
            stack.extend([*obj.keys(), *obj.values()])
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


def model_state_census(trainer) -> dict[str, int]:
    """Bytes of the tensors the engine and the trainer hold now, by kind (as `model_state_bytes`)."""
    model, engine = trainer.model, trainer.engine
    basic = engine.basic_optimizer
    params = _storages(model.parameters())
    moments = _storages(v for state in basic.state.values() for v in state.values() if torch.is_tensor(v))
    master = {ptr: size for ptr, size in _storages(p for g in basic.param_groups for p in g["params"]).items()
              if ptr not in params}
    buckets = _storages(buffer for bucket in getattr(engine.optimizer, "ipg_buckets", {}).values()
                        for buffer in bucket.buffer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    held = _storages([*_reachable_tensors(engine.optimizer), *grads])
    known = params.keys() | moments.keys() | master.keys() | buckets.keys()
    return {
        "parameters": sum(params.values()),
        "gradients": sum(size for ptr, size in held.items() if ptr not in known),
        "reduce_bucket": sum(buckets.values()),
        "master_weights": sum(master.values()),
        "optimizer_state": sum(moments.values()),
        "ema": sum(_storages(trainer.ema.shadow).values()),
    }


@contextmanager
def counting_bytes_sent(counts: dict[str, int]):
    """Adds to counts["moe_all_to_all"] the bytes every all_to_all_single sends to other ranks, and to
    counts["routing_all_gather"] those a ring all-gather sends ((n - 1) times its input) while inside."""
    all_to_all_single, all_gather = dist.all_to_all_single, dist.all_gather

    def counted_all_to_all(output, input, output_split_sizes, input_split_sizes, group=None, **kwargs):
        rank, row_bytes = dist.get_rank(group), input[0].numel() * input.element_size() if len(input) else 0
        counts["moe_all_to_all"] += row_bytes * sum(rows for peer, rows in enumerate(input_split_sizes) if peer != rank)
        return all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    def counted_all_gather(tensor_list, tensor, group=None, **kwargs):
        counts["routing_all_gather"] += (len(tensor_list) - 1) * tensor.numel() * tensor.element_size()
        return all_gather(tensor_list, tensor, group=group, **kwargs)

    dist.all_to_all_single, dist.all_gather = counted_all_to_all, counted_all_gather
    try:
        yield counts
    finally:
        dist.all_to_all_single, dist.all_gather = all_to_all_single, all_gather


def measure(config: Config, runtime) -> dict[str, int]:
    """Two optimizer steps of the real trainer on this layout (collective). Returns this rank's model
    state by kind (each kind's largest size at the end of a backward, in ZeRO's gradient reduction and
    before the optimizer steps), the activations the first micro-batch's forward kept, the bytes the
    second step sent to other ranks (see `counting_bytes_sent`) and, on GPUs, its peak allocated memory."""
    from .train.trainer import Trainer

    trainer = Trainer(config, runtime)
    engine, objective = trainer.engine, trainer.objective
    result = dict.fromkeys(MODEL_STATE_KINDS, 0)

    def sampled(method):
        def wrapper(*args, **kwargs):
            for kind, size in model_state_census(trainer).items():
                result[kind] = max(result[kind], size)
            return method(*args, **kwargs)
        return wrapper

    engine.allreduce_gradients, engine.step = sampled(engine.allreduce_gradients), sampled(engine.step)
    if hasattr(engine.optimizer, "independent_gradient_partition_epilogue"):  # ZeRO 1/2, the bucket still held
        engine.optimizer.independent_gradient_partition_epilogue = sampled(
            engine.optimizer.independent_gradient_partition_epilogue)
    training_losses = objective.training_losses

    def first_forward(*args):
        objective.training_losses = training_losses
        with counting_kept_tensors([*trainer.model.parameters(), *trainer.model.buffers()]) as kept:
            losses = training_losses(*args)
        result["activations"] = sum(kept.values())
        return losses

    objective.training_losses = first_forward
    trainer.train_step()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    with counting_bytes_sent({"moe_all_to_all": 0, "routing_all_gather": 0}) as sent:
        trainer.train_step()
    result.update(sent)
    if runtime.device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated(runtime.device)
    return result
