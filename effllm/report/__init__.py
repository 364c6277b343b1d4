"""The report layer: runs the notebooks with papermill and renders them into one HTML report.

`runner` executes a profile's notebooks into `reports/<run>/`; `html` renders them (a Jinja template in
`templates/`); `results`, `tables`, `findings`, `reference` and `plots` turn tidy rows into what the
notebooks show; `notebook` is the one setup call each notebook makes; `cli` is the `effllm` command.
Nothing below this layer imports it, and importing it loads neither torch nor papermill.
"""
