"""ClientConfig: a token never shows in its repr (it reaches logs and job reports)."""

from clients.channel import ClientConfig


def test_the_token_stays_out_of_the_repr() -> None:
    config = ClientConfig(target="h:1", token="s3cret-token")
    assert "s3cret-token" not in repr(config) and "h:1" in repr(config)
    assert config.token == "s3cret-token"
