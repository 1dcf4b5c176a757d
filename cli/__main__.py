"""``python -m wsi_ssl.cli``: the ``wsi-ssl`` command."""

from wsi_ssl.cli.main import run

if __name__ == "__main__":
    run()
