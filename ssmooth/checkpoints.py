"""Import checkpoints published with the randomized-smoothing papers into ssmooth's own checkpoint format.

  model, meta = import_published("noise_0.25/checkpoint.pth.tar", family="cohen", dataset="cifar10", sigma=0.25)
  write_checkpoint("cohen_cifar10_s0.25.ckpt", model, meta)    # then: ssmooth-certify ckpt=cohen_cifar10_s0.25.ckpt

This is the only module that knows other projects' file layouts. What it relies on, read from their public code:

* Families and what their files hold (``torch.save`` of a plain dict):
  - ``cohen`` (Cohen et al. 2019), ``smoothadv`` (Salman et al. 2019), ``consistency`` (Jeong & Shin 2020):
    ``{'epoch', 'arch', 'state_dict', 'optimizer'}``. The state_dict is that of ``Sequential(normalization,
    network)``, so network keys start with ``1.``; ImageNet networks were wrapped in DataParallel, giving
    ``1.module.``. The normalization layer keeps mean/std as plain attributes: nothing of it is in the file.
    The three families cannot be told apart from a file: the user's ``family`` decides the normalization.
  - ``macer`` (Zhai et al. 2020): ``{'net', 'epoch'}``, network keys with no prefix (``module.`` is accepted for
    a network saved from a DataParallel wrapper).
* ``arch`` strings: ``cifar_resnet20``, ``cifar_resnet110``, ``resnet50``, ``lenet``.
* Network keys: CIFAR ResNet ``conv1``, ``bn1``, ``layer{1,2,3}.{block}.{conv1,bn1,conv2,bn2}``, ``downsample.{0,1}``
  where the shape changes, ``fc`` (ResNet-110: 668 tensors); MNIST LeNet ``conv1``, ``conv2``, ``fc1``, ``fc2``;
  ImageNet: torchvision's ``resnet50`` keys, which are also ours.
* Normalization, which is NOT in any file (see ``default_normalization``): mean/std for Cohen and Consistency on
  CIFAR-10 and ImageNet; mean subtraction only (std 1) for SmoothAdv, except its CIFAR-10 models under the
  folders ``finetune_cifar_from_imagenetPGD2steps`` and ``self_training`` (mean/std); none (raw [0,1] pixels) for
  MACER and for every MNIST LeNet.
* The training noise level is not in the files either (only in their folder names): the user gives ``sigma``.

An imported checkpoint is an ssmooth checkpoint like any other (``{"ssmooth": meta, "state_dict": {"model.*"}}``),
with the normalization as the model's first layer and the source file, its sha256, the family and the
normalization recorded under ``meta["imported"]``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ssmooth.certify.runfolder import file_sha256

FAMILIES = ("cohen", "smoothadv", "consistency", "macer")
NORMALIZATIONS = ("mean_std", "mean_only", "none")
# What each family published, by dataset: the ssmooth model config of the network.
SUPPORTED: dict[tuple[str, str], dict] = {
    **{(family, "cifar10"): {"name": "cifar_resnet"} for family in FAMILIES},
    ("consistency", "mnist"): {"name": "lenet"},
    ("macer", "mnist"): {"name": "lenet"},
    **{(family, "imagenet"): {"name": "resnet50"} for family in ("cohen", "smoothadv", "consistency")},
}
# The ``arch`` string each network is saved under (a CIFAR ResNet's names its depth).
ARCH_PATTERNS = {"cifar_resnet": r"cifar_resnet(\d+)", "lenet": r"lenet", "resnet50": r"resnet50"}
# SmoothAdv's CIFAR-10 folders whose models normalize by mean and std, not by the mean alone.
SMOOTHADV_MEAN_STD_FOLDERS = ("finetune_cifar_from_imagenetPGD2steps", "self_training")
COHEN_LIKE = "cohen/smoothadv/consistency"  # one layout, three families


class ImportMismatch(ValueError):
    """A published file that cannot be imported as asked; the message names the mismatch."""


def default_normalization(family: str, dataset: str, path: str | Path = "") -> str:
    """The normalization the family's code put in front of its network (see the module docstring)."""
    if family == "macer" or dataset == "mnist":
        return "none"
    if family == "smoothadv":
        folders = set(Path(path).parts)
        if dataset == "cifar10" and folders & set(SMOOTHADV_MEAN_STD_FOLDERS):
            return "mean_std"
        return "mean_only"
    return "mean_std"


def read_published(path: str | Path) -> dict:
    """The published file as a dict; never unpickles arbitrary objects (these files hold only tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"published checkpoint not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a torn, foreign or pickled-object file
        raise ImportMismatch(f"{path} could not be read as a torch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(content, dict):
        raise ImportMismatch(f"{path} holds a {type(content).__name__}, not a checkpoint dict")
    return content


def detect_layout(content: dict) -> str:
    """``"macer"``, ``COHEN_LIKE`` or ``"ssmooth"`` from the file's top-level keys; ImportMismatch otherwise."""
    keys = set(content)
    if "ssmooth" in keys:
        return "ssmooth"
    if "state_dict" in keys and "arch" in keys:
        return COHEN_LIKE
    if "net" in keys and "state_dict" not in keys:
        return "macer"
    raise ImportMismatch(f"top-level keys {sorted(map(str, keys))[:8]} match no published layout: "
                         f"{COHEN_LIKE} files hold {{'epoch', 'arch', 'state_dict', 'optimizer'}}, MACER files "
                         "{'net', 'epoch'}")


def network_state(content: dict, layout: str) -> tuple[dict[str, torch.Tensor], str]:
    """The network's tensors with the wrapper prefix removed, and the prefix that was removed."""
    state = content["net"] if layout == "macer" else content["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ImportMismatch(f"the file's {'net' if layout == 'macer' else 'state_dict'} is not a non-empty dict")
    prefixes = ("module.", "") if layout == "macer" else ("1.module.", "1.")
    for prefix in prefixes:
        if all(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items()}, prefix
    stray = next(key for key in state if not key.startswith(prefixes[-1]))
    raise ImportMismatch(f"key {stray!r} lacks the prefix {' or '.join(repr(p) for p in prefixes if p)} that every "
                         f"network key of a {layout} file has")


# --- our parameter names -> theirs, per architecture --------------------------------------------------------


def _cifar_resnet_names(blocks_per_stage: int) -> Callable[[str], str]:
    """Ours: ``stem.{0,1}``, ``stages.{i}.{conv1,bn1,conv2,bn2,shortcut.{0,1}}``, ``fc``; theirs: ``conv1``,
    ``bn1``, ``layer{i // n + 1}.{i % n}.{..., downsample.{0,1}}``, ``fc``."""

    def published(key: str) -> str:
        key = re.sub(r"^stem\.0\.", "conv1.", key)
        key = re.sub(r"^stem\.1\.", "bn1.", key)
        match = re.match(r"^stages\.(\d+)\.(.*)$", key)
        if match:
            block, rest = int(match.group(1)), match.group(2).replace("shortcut.", "downsample.")
            key = f"layer{block // blocks_per_stage + 1}.{block % blocks_per_stage}.{rest}"
        return key

    return published


LENET_NAMES = {"0": "conv1", "3": "conv2", "7": "fc1", "9": "fc2"}  # positions in our nn.Sequential


def _lenet_name(key: str) -> str:
    position, _, rest = key.partition(".")
    return f"{LENET_NAMES.get(position, position)}.{rest}"


def _model_config(family: str, dataset: str, state: dict[str, torch.Tensor], arch: str | None) -> dict:
    """Our model config for the file's network, checked against ``arch`` when the file has one."""
    config = dict(SUPPORTED[family, dataset])
    name = config["name"]
    if arch is not None:
        match = re.fullmatch(ARCH_PATTERNS[name], str(arch))
        if match is None:
            expected = {"cifar_resnet": "cifar_resnet<depth>"}.get(name, name)
            raise ImportMismatch(f"the file's arch {arch!r} is not the {dataset} network of {family} ({expected})")
    if name == "cifar_resnet":
        blocks = {int(m.group(1)) for key in state if (m := re.match(r"^layer1\.(\d+)\.", key))}
        if not blocks:
            raise ImportMismatch("no key 'layer1.<block>.*': the file does not hold a CIFAR ResNet")
        depth = 6 * (max(blocks) + 1) + 2
        if arch is not None and int(match.group(1)) != depth:
            raise ImportMismatch(f"the file's arch {arch!r} says depth {match.group(1)}, its keys hold {depth} layers")
        config["depth"] = depth
    return config


def _published_name(config: dict) -> Callable[[str], str]:
    if config["name"] == "cifar_resnet":
        return _cifar_resnet_names((config["depth"] - 2) // 6)
    if config["name"] == "lenet":
        return _lenet_name
    return lambda key: key  # torchvision's resnet50 is ours


def _load_network(body: nn.Module, state: dict[str, torch.Tensor], published: Callable[[str], str],
                  looks_like: str) -> None:
    """Copy the file's tensors into ``body`` by name; every name and shape must match, none may be left over."""
    ours = body.state_dict()
    theirs_for = {published(key): key for key in ours}
    missing = [key for key in theirs_for if key not in state]
    unexpected = [key for key in state if key not in theirs_for]
    if missing or unexpected:
        parts = ([f"missing key(s) {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
                 if missing else [])
        parts += ([f"unexpected key(s) {unexpected[:3]}" + (f" and {len(unexpected) - 3} more"
                                                          if len(unexpected) > 3 else "")] if unexpected else [])
        raise ImportMismatch(f"the file ({looks_like} layout) does not hold the expected network: {'; '.join(parts)}")
    for theirs, our_key in theirs_for.items():
        if tuple(state[theirs].shape) != tuple(ours[our_key].shape):
            raise ImportMismatch(f"key {theirs!r} has shape {tuple(state[theirs].shape)} in the file, the network "
                                 f"needs {tuple(ours[our_key].shape)}")
    body.load_state_dict({our_key: state[theirs] for theirs, our_key in theirs_for.items()})


def import_published(
    path: str | Path, family: str, dataset: str, sigma: float, normalization: str | None = None
) -> tuple[nn.Module, dict]:
    """Build our model from a published checkpoint: returns ``(model, meta)``.

    ``model`` maps images in [0,1] to the same logits as the published network behind its normalization layer
    (that layer is our model's first). ``meta`` is an ssmooth checkpoint's metadata (dataset, model config,
    constant noise at ``sigma``) plus ``meta["imported"]``: source file, sha256, family, normalization.
    ``normalization``: ``mean_std``, ``mean_only`` or ``none``; None takes the family's own (``default_normalization``).
    Raises ImportMismatch naming the key, shape, arch or family that does not match.

    Long for its arguments; each published layout's steps read best in order."""
    from ssmooth.data import dataset_info
    from ssmooth.models import create_model

    if family not in FAMILIES:
        raise ImportMismatch(f"family {family!r} must be one of {FAMILIES}")
    if (family, dataset) not in SUPPORTED:
        published = sorted(d for f, d in SUPPORTED if f == family)
        raise ImportMismatch(f"{family} published no {dataset} networks that can be imported (only {published})")
    info = dataset_info(dataset)
    if not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ImportMismatch(f"sigma={sigma!r} must be > 0 (the noise level the network was trained at)")
    if normalization is None:
        normalization = default_normalization(family, dataset, path)
    if normalization not in NORMALIZATIONS:
        raise ImportMismatch(f"normalization {normalization!r} must be one of {NORMALIZATIONS}")

    path = Path(path)
    content = read_published(path)
    layout = detect_layout(content)
    if layout == "ssmooth":
        raise ImportMismatch(f"{path} is already an ssmooth checkpoint: certify or finetune it directly")
    expected_layout = "macer" if family == "macer" else COHEN_LIKE
    if layout != expected_layout:
        raise ImportMismatch(f"{path} looks like a {layout} file, not {family}'s ({expected_layout} layout); "
                             f"pass the family that published it")
    state, prefix = network_state(content, layout)
    arch = content.get("arch") if layout == COHEN_LIKE else None
    config = _model_config(family, dataset, state, arch)
    # The Normalize layer's buffers carry mean and std (std 1 for mean_only) into the checkpoint; "none" is the
    # identity layer that every model without normalization has.
    config["normalize"] = normalization != "none"

    mean = {"mean_std": info.mean, "mean_only": info.mean, "none": (0.0,) * len(info.mean)}[normalization]
    std = {"mean_std": info.std}.get(normalization, (1.0,) * len(info.std))
    options = {k: v for k, v in config.items() if k not in ("name", "normalize")}
    model = create_model(config["name"], num_classes=info.num_classes, input_shape=info.input_shape,
                         mean=mean, std=std, **options)
    _load_network(model.body, state, _published_name(config), looks_like=layout)
    model.eval()

    meta = {
        "name": f"{family}_{dataset}_{config['name']}_s{sigma}",
        "stage": "pretrain",
        "dataset": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape)},
        "model": config,
        "objective": {"cohen": "gaussian"}.get(family, family),
        "noise": {"kind": "constant", "sigma": float(sigma), "grid": []},
        "seed": 0,
        "imported": {
            "source": str(path.resolve()), "sha256": file_sha256(path), "family": family, "layout": layout,
            "arch": arch, "epoch": content.get("epoch"), "key_prefix": prefix,
            "normalization": {"kind": normalization, "mean": list(mean), "std": list(std)},
        },
    }
    return model, meta


def write_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Save ``model`` as an ssmooth checkpoint (``ssmooth-certify ckpt=...``, ``ssmooth-train stage=finetune
    pretrained=...``): the training module's layout, the network under ``model.``. Written to a temporary file
    and renamed, so an interrupted write never leaves a torn checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"model.{key}": value.detach().cpu() for key, value in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    torch.save({"ssmooth": meta, "state_dict": state}, partial)
    partial.replace(path)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load any ssmooth checkpoint (trained, finetuned, with a level selector, or imported) for use from Python.

        model, meta = ssmooth.load_model("outputs/runs/RUN/checkpoints/last.ckpt")
        cert = ssmooth.certify.certify(model, x, meta["sigma"], n0=100, n=100_000, alpha=0.001,
                                       batch_size=1000, num_classes=meta["num_classes"])

    Returns ``(model, meta)``. ``model`` (eval mode, on ``device``) maps images in [0, 1], shape
    ``[k, *meta["input_shape"]]``, to ``meta["num_classes"]`` logits; its normalization is its first layer, so
    never normalize the inputs yourself. ``meta`` is the checkpoint's metadata plus:

    - ``num_classes``, ``input_shape`` (``meta["dataset"]["name"]`` names the dataset);
    - ``sigma``: the noise level the model was trained at, and ``levels``: every level it was trained with
      (the grid of sample-wise training; ``[sigma]`` for a constant level);
    - ``normalization``: ``{"mean": [...], "std": [...]}`` of the model's first layer (0 and 1: none);
    - ``level_selector``: ``(h_e, grid, sigma_e)`` for a checkpoint with a level selector (pass it as
      ``ssmooth.evaluate.certify_model(..., selector=meta["level_selector"])``), else None.

    Raises FileNotFoundError for a missing file and ValueError for one that is not an ssmooth checkpoint.
    """
    from ssmooth.data import dataset_info
    from ssmooth.lit.module import load_checkpoint, model_state
    from ssmooth.models import create_model

    meta, state = load_checkpoint(path)
    info = dataset_info(meta["dataset"]["name"])
    options = dict(meta["model"])
    name, normalize = options.pop("name"), options.pop("normalize", True)
    model = create_model(name, num_classes=info.num_classes, input_shape=info.input_shape,
                         mean=info.mean if normalize else None, std=info.std if normalize else None, **options)
    model.load_state_dict(model_state(state))  # the checkpoint's own normalization, e.g. an imported one
    selector = None
    if "selector" in meta:
        from ssmooth.lit.selector import load_selector

        h_e, grid, sigma_e = load_selector(meta, state, info)
        selector = (h_e.to(device).eval(), grid, sigma_e)
    sigma = float(meta["noise"]["sigma"])
    return model.to(device).eval(), {
        **meta,
        "num_classes": info.num_classes, "input_shape": list(info.input_shape),
        "sigma": sigma, "levels": [float(s) for s in meta["noise"].get("grid") or [sigma]],
        "normalization": {"mean": model.normalize.mean.tolist(), "std": model.normalize.std.tolist()},
        "level_selector": selector,
        "checkpoint": str(path),
    }
