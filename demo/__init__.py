"""The visreg_hub Gradio demo: ``python -m demo.app`` (see demo/README.md).

``demo.service`` holds the logic (models, galleries, extraction, retrieval) without Gradio, with
``demo.menus`` (the bundled sets and the menu choices) and ``demo.uploads`` (upload checks);
``demo.cache`` the on-disk index cache; ``demo.app`` the page; ``demo.make_gallery`` builds the bundled
gallery and examples from real Fashion-MNIST test images.
"""
