"""The wsi-ssl command."""
