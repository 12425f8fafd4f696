"""The command-line interface: one module per verb, no logic beyond parsing and rendering."""
