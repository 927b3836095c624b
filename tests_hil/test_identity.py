"""Flash or deploy the board's default payload and check the board says it runs it."""


def test_install_and_identify(board, default_payload, installed):
    record, identity = installed
    assert record.board == board.name and record.model_sha256 == default_payload.info.sha256, record
    assert len(record.firmware_sha256) == 64, record  # what runs the model: the image, or the runner
    assert identity.model_sha256 == default_payload.info.sha256, (
        f"{board.name} reports model {identity.model_sha256}, expected {default_payload.name} "
        f"{default_payload.info.sha256} after install {record}"
    )
