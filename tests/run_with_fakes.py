"""``python tests/run_with_fakes.py <grazbids arguments>``: the grazbids command with the
fast stand-in workflows of cli_helpers, in a process of its own (signal and stdout tests
need real processes: a signal to the test runner, or its captured descriptors, would not do)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cli_helpers import fake_group_builder, fake_participant_builder  # noqa: E402
from grazbids.cli import preflight  # noqa: E402
from grazbids.cli.run import main  # noqa: E402
from grazbids.workflows import base  # noqa: E402

base.load_participant_builder = lambda: fake_participant_builder()
base.load_group_builder = lambda: fake_group_builder()
preflight.check_template = lambda config: None

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
