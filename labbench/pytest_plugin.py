"""pytest plugin: --lab, --board, --list-boards, the `board` fixture and the `requires` marker."""
