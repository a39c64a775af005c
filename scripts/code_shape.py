"""The longest functions and the largest files of a source tree (a measurement, not a test).

    python scripts/code_shape.py [src/spiral_cli] [-n 10]

A function's length is its lines from `def` to its last line (docstring and comments included;
nested functions count inside their parent and are listed on their own too); a file's size is its
line count.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path


def functions(path: Path, root: Path) -> list[tuple[int, str]]:
    """(length in lines, 'file:line qualified.name') for every function and method in `path`."""
    out: list[tuple[int, str]] = []
    rel = path.relative_to(root)

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((child.end_lineno - child.lineno + 1, f"{rel}:{child.lineno} {name}"))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="src/spiral_cli", type=Path)
    ap.add_argument("-n", type=int, default=10, help="how many of each to list")
    args = ap.parse_args()
    files = sorted(args.root.rglob("*.py"))
    funcs = sorted((f for p in files for f in functions(p, args.root)), key=lambda f: (-f[0], f[1]))
    sizes = sorted(((len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(args.root)))
                    for p in files), key=lambda s: (-s[0], s[1]))
    print(f"longest functions ({len(funcs)} in {len(files)} files):")
    for n, where in funcs[: args.n]:
        print(f"  {n:5d}  {where}")
    print("largest files:")
    for n, where in sizes[: args.n]:
        print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
