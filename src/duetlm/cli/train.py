"""`duet train`, `duet plot-train` and `duet pretrain-pair`: the joint training and the
embedded pair's own pretraining."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from duetlm.cli.app import app, console, friendly_errors
from duetlm.errors import ConfigError


@app.command()
@friendly_errors
def train(
    config: Annotated[Path | None, typer.Option(help="TrainConfig as TOML/YAML/JSON (see configs/).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/last exactly (optimizer, λ, RNG, data).")
    ] = False,
    out: Annotated[str | None, typer.Option(help="Override the run folder.")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a knob: SECTION.KNOB=VALUE (a TOML value: --set objective.kl_beta=0 "
            "--set parallel.strategy='\"fsdp\"' or parallel.strategy=fsdp); repeatable.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Start over in a folder that holds a run (the old run is moved aside).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Load nothing; print the per-device memory plan and whether it fits.")
    ] = False,
    device_memory: Annotated[
        str | None,
        typer.Option(help="Memory of one device, for --dry-run; default the config's [layout] (80GB)."),
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Devices (processes) for --dry-run; default the config's [layout], else $WORLD_SIZE or 1.",
        ),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(min=1, help="Nodes the devices are spread over, for --dry-run; default [layout]."),
    ] = None,
) -> None:
    """Joint DUET training (length-penalized GRPO) of M and m; see docs/design.md section 2.
    Several processes: torchrun --nproc_per_node N --no-python duet train ... (docs/training.md)."""
    from duetlm.train.config import TrainConfig, with_settings

    base = TrainConfig.load(config) if config is not None else TrainConfig()
    settings = {k: v for k, v in {"out": out, "steps": steps}.items() if v is not None}
    settings |= dict(_setting(text) for text in set_ or [])
    train_config = with_settings(base, settings, source=str(config or "defaults")) if settings else base
    if dry_run:
        from duetlm.train.planning.memory import parse_size, render

        layout = train_config.layout
        world = devices or layout.devices or int(os.environ.get("WORLD_SIZE", "1"))
        memory = parse_size(device_memory or layout.device_memory)
        text, fits = render(train_config, memory, world, nodes or layout.nodes)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(0 if fits else 1)
    from torch.distributed.elastic.multiprocessing.errors import record

    from duetlm.train.loop.trainer import train as run_training

    # under torchrun, a process that fails writes its error where the launcher reports it
    folder = record(run_training)(train_config, resume=resume, force=force)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(
            f"run folder: {folder} (checkpoint: {folder / 'last'}, metrics: {folder / 'metrics.jsonl'})"
        )


def _setting(text: str) -> tuple[str, object]:
    """`section.knob=value` with the value read as TOML (a bare word is a string)."""
    from duetlm.config import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: write SECTION.KNOB=VALUE, e.g. --set objective.kl_beta=0")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


@app.command("plot-train")
@friendly_errors
def plot_train(run: Annotated[Path, typer.Argument(help="A run folder written by duet train.")]) -> None:
    """Signal length, λ and pair accuracy over steps, as RUN/training_curves.png."""
    from duetlm.train.planning.plots import plot_training

    console.print(f"plot: {plot_training(run)}")


@app.command("pretrain-pair")
@friendly_errors
def pretrain_pair_command(
    out: Annotated[
        Path,
        typer.Option(help="Folder for tiny-M/ and tiny-m/ (copy them into src/duetlm/assets/ to ship them)."),
    ] = Path("runs/pretrain-pair"),
    seed: Annotated[int, typer.Option(help="Seed of data, initialization and tokenizer.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads for torch.")] = 2,
    reuse_capable: Annotated[
        bool, typer.Option(help="Keep the M already trained in OUT; retrain m only.")
    ] = False,
    reuse_light: Annotated[
        bool, typer.Option(help="Keep the m already trained in OUT; retrain M only.")
    ] = False,
) -> None:
    """Retrain the embedded pair from scratch on the builtin task (about 25 minutes on 2 CPU cores)."""
    from duetlm.models.pretrain import PretrainConfig, pretrain_pair

    if reuse_capable and reuse_light:
        raise ConfigError("--reuse-capable and --reuse-light together leave nothing to train")
    report = pretrain_pair(
        out, PretrainConfig(seed=seed, threads=threads), reuse_capable=reuse_capable, reuse_light=reuse_light
    )
    for name in ("capable", "light"):
        part = report[name]
        status = "[green]passed[/]" if part["passed"] else "[red]did not pass[/]"
        console.print(
            f"{name}: {part['steps']} steps, {part['seconds']:.0f}s, gate {status}: {part['history'][-1]}"
        )
    console.print(f"saved to {out}")


@app.command("export")
@friendly_errors
def export_command(
    run: Annotated[Path, typer.Argument(help="A run folder written by duet train.")],
    out: Annotated[
        Path | None, typer.Option(help="Where the release folders go; default RUN/export.")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="bfloat16 (the release default), float16 or float32.")
    ] = "bfloat16",
) -> None:
    """Release folders from a run's last checkpoint (`whole` or `sharded`): each trained model as
    a Hugging Face folder, LoRA merged, with its tokenizer and generation config, that
    transformers and vLLM load as they are (`duet serve --capable vllm:RUN/export/capable`)."""
    from duetlm.train.loop.export import export_run

    for role, folder in export_run(run, out, dtype).items():
        console.print(f"{role}: {folder}")
