"""Rewrites tunelite/config/signatures.json, the table `tunelite validate` reads components'
signatures from without importing torch. Run it after changing a public function or class of
tunelite's models, tokenizers, data, checkpointing, training or modules packages (a test says when):

    python scripts/make_signature_table.py
"""

from tunelite.config.signatures import TABLE, build_table, write_table

if __name__ == "__main__":
    table = build_table()
    write_table(table)
    print(f"wrote {len(table['components'])} signatures to {TABLE}")
