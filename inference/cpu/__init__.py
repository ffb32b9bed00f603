"""The CPU decode paths: `paths` decides and names the one in force; the kernels below it never re-derive it."""
