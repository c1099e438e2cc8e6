"""The app's side of the project: model store, sessions and runs, chat, forms and one module per tab.

Nothing here computes a compression: every number comes from :mod:`compression`; ``app.py`` only
assembles these pieces into a Gradio Blocks.
"""
