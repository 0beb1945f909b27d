"""The draw-a-digit demo: a page where one draws a digit and sees what the served model reads.

`app` is the same-origin web app (the page and a proxy to the model server's /invocations);
`__main__` is the command (`make demo`, `python -m mnist_mlops.demo`) that starts the model
server and the app. The page itself is plain HTML, CSS and JavaScript under `static/`.
"""
