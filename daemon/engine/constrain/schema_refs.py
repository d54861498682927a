"""Local `$ref`s of a JSON Schema: whether a schema has them, moving them under another root, and refs that
loop through nothing but refs (no value satisfies them; a grammar engine would refuse or recurse forever)."""

from __future__ import annotations

from typing import Any


def has_local_ref(schema: Any) -> bool:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        return (isinstance(ref, str) and ref.startswith("#")) or any(has_local_ref(v) for v in schema.values())
    return isinstance(schema, list) and any(has_local_ref(v) for v in schema)


def rebase_refs(schema: Any, base: str) -> Any:
    if isinstance(schema, dict):
        out = {k: rebase_refs(v, base) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(schema, list):
        return [rebase_refs(v, base) for v in schema]
    return schema


def ref_loop(schema: dict[str, Any]) -> str | None:
    """A local `$ref` that leads back to itself through nothing but refs ({"$ref": "#"} at the root, or two
    $defs naming each other): no JSON value is ever produced by it, and a grammar engine loops or refuses."""
    def resolve(ref: str) -> Any:
        node: Any = schema
        for part in ref.lstrip("#").strip("/").split("/") if ref.strip("#/") else []:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def walk(node: Any) -> str | None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                seen, target = {ref}, resolve(ref)
                while isinstance(target, dict) and isinstance(target.get("$ref"), str) and len(target) == 1:
                    if target["$ref"] in seen:
                        return ref
                    seen.add(target["$ref"])
                    target = resolve(target["$ref"])
                if target is node and len(node) == 1:
                    return ref
            return next((r for v in node.values() if (r := walk(v)) is not None), None)
        if isinstance(node, list):
            return next((r for v in node if (r := walk(v)) is not None), None)
        return None

    return walk(schema)
