"""Reading a TOML file a person wrote (definitions, a server config): one error naming the
file, what is wrong and the fix, whatever the failure."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

_BYTE_ORDER_MARK = "\ufeff"


def read_toml(path: Path, what: str, fix: str, error: type[Exception]) -> dict[str, Any]:
    """The TOML document in `path`; `error` naming the file when it cannot be read (with `fix`,
    how to give another one), is not UTF-8 or is not valid TOML. `what` names the file's role
    in the messages ("config file"). A leading UTF-8 byte-order mark (some editors save one)
    is skipped."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8").removeprefix(_BYTE_ORDER_MARK))
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}; {fix}") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the {what} as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}; fix that line") from None
