"""The HTML explanation report: page template and style (``html.py``) and a headless-browser
screenshot of a finished report (``screenshot.py``). ``protomask_jax.explain`` fills them."""
