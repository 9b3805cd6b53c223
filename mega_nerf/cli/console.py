"""The console scripts (pyproject.toml), apart from the commands' modules: each starts its command through
errors.run_command, which imports the command's module itself, so that Ctrl-C during the imports is one line."""
from mega_nerf.cuda_context import PARTITION, TRAIN, TRAIN_CELLS
from mega_nerf.errors import run_command


def preview() -> None:
    run_command("mega_nerf.cli.preview")


def export_cameras() -> None:
    run_command("mega_nerf.cli.preview", "cameras_main")


def colmap() -> None:
    run_command("mega_nerf.cli.convert", "colmap_main")


def transforms() -> None:
    run_command("mega_nerf.cli.convert", "transforms_main")


def partition() -> None:
    run_command("mega_nerf.cli.partition", cuda_context=PARTITION)


def parscript() -> None:
    run_command("mega_nerf.cli.parscript")


def train() -> None:
    run_command("mega_nerf.cli.train", cuda_context=TRAIN)


def train_cells() -> None:
    run_command("mega_nerf.cli.train_cells", cuda_context=TRAIN_CELLS)


def launch() -> None:
    run_command("mega_nerf.cli.launch")


def merge() -> None:
    run_command("mega_nerf.cli.merge")


def evaluate() -> None:
    run_command("mega_nerf.cli.eval")


def render() -> None:
    run_command("mega_nerf.cli.render")


def export() -> None:
    run_command("mega_nerf.cli.export")


def view() -> None:
    run_command("mega_nerf.cli.view")
