"""trb_exp: on-policy distillation with Trust-Region Behavior Blending."""

__version__ = "0.1.0"


def conf_dir() -> str:
    """The Hydra config tree: ``trb_exp/conf`` in an installed wheel, else ``conf/`` of the source checkout."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if (packaged / "config.yaml").is_file() else here.parent / "conf")


CONF_DIR = conf_dir()  # the one config tree every entrypoint composes from
