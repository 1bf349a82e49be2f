"""download.sh against a fake signed-URL server on 127.0.0.1 (tests/fake_llama_server.py).

Every run goes through `run_download`, which gives the script a PATH holding only the tools it
may use (so hiding wget or md5sum is a matter of leaving them out), a fake `df` that reports as
much free space as the test says, and asserts that the signed URL never shows in its output.
"""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest
from fake_llama_server import (
    LLAMA2_SHARDS,
    LLAMA3_LOCAL,
    LLAMA3_REMOTE,
    LLAMA3_SHARDS,
    SIGNATURE,
    LlamaMirror,
    llama2_folder,
    write_llama2_tree,
    write_llama3_tree,
)

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "download.sh"
BASH = shutil.which("bash")
# What download.sh may call besides a fetcher and an md5 tool; anything else fails the test.
TOOLS = ["awk", "cut", "du", "head", "mkdir", "mktemp", "mv", "rm", "sed", "sleep", "tr"]
PLENTY_KB = 10**12  # a petabyte: the default fake df never stops a download

FETCHERS = [
    pytest.param("wget", marks=pytest.mark.skipif(not shutil.which("wget"), reason="wget not installed")),
    pytest.param("curl", marks=pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")),
]
HAVE_A_FETCHER = pytest.mark.skipif(not (shutil.which("wget") or shutil.which("curl")), reason="no wget or curl")
pytestmark = [HAVE_A_FETCHER, pytest.mark.skipif(BASH is None, reason="bash not installed")]


def make_tools(folder: Path, fetcher: Optional[str] = None, md5: str = "md5sum", free_kb: int = PLENTY_KB) -> Path:
    """A bin folder for PATH: links to the real TOOLS, the fetcher and md5 tool asked for, a fake df.

    fetcher None links every fetcher installed; md5 "md5" installs a stand-in for macOS's md5.
    """
    folder.mkdir()
    fetchers = [fetcher] if fetcher else [name for name in ("wget", "curl") if shutil.which(name)]
    for name in TOOLS + fetchers + (["md5sum"] if md5 == "md5sum" else []):
        (folder / name).symlink_to(shutil.which(name))
    if md5 == "md5":
        write_script(
            folder / "md5",
            f"#!{shutil.which('python3') or 'python3'}\n"
            "import hashlib, sys\n"
            "assert sys.argv[1] == '-q', sys.argv  # macOS: md5 -q FILE prints the bare digest\n"
            f"open({str(folder / 'md5.calls')!r}, 'a').write(sys.argv[2] + '\\n')\n"
            "print(hashlib.md5(open(sys.argv[2], 'rb').read()).hexdigest())\n",
        )
    write_script(
        folder / "df",
        "#!/bin/sh\n"
        "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"echo 'fake {PLENTY_KB} 0 {free_kb} 0% /'\n",
    )
    return folder


def write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def run_download(
    tmp_path: Path,
    url: str,
    env: Optional[Dict[str, str]] = None,
    stdin: str = "",
    cwd: Optional[Path] = None,
    tools: Optional[Path] = None,
) -> subprocess.CompletedProcess:
    """Run download.sh; `env` holds its variables (PRESIGNED_URL is given only when interactive=False)."""
    if tools is None:
        tools = tmp_path / "bin"
        if not tools.exists():
            make_tools(tools)
    full_env = {"PATH": str(tools), "HOME": str(tmp_path), "LC_ALL": "C"}
    full_env.update(env or {})
    result = subprocess.run(
        [BASH, str(SCRIPT)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd or tmp_path,
        env=full_env,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert url not in output and SIGNATURE not in output, "the signed URL was printed"
    return result


def env_for(url: str, version: int, models: str, target: Path, **extra: str) -> Dict[str, str]:
    env = {"PRESIGNED_URL": url, "LLAMA_VERSION": str(version), "MODEL_SIZE": models, "TARGET_FOLDER": str(target)}
    env.update(extra)
    return env


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_same_files(local: Path, remote: Path, names: Iterable[str]) -> None:
    for name in names:
        assert (local / name).is_file(), f"{local / name} is missing"
        assert md5(local / name) == md5(remote / name), f"{local / name} differs from the server's"


def assert_loads_as_checkpoint(folder: Path, n_shards: int) -> None:
    """What the library needs of a model folder: params.json and n_shards torch-loadable shards."""
    shards = sorted(folder.glob("consolidated.*.pth"))
    assert [p.name for p in shards] == [f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    for shard in shards:
        state_dict = torch.load(shard, map_location="cpu", weights_only=True)
        assert "tok_embeddings.weight" in state_dict
    assert isinstance(json.loads((folder / "params.json").read_text()), dict)


@pytest.fixture
def llama2(tmp_path):
    write_llama2_tree(tmp_path / "remote")
    with LlamaMirror(tmp_path / "remote") as mirror:
        yield mirror


@pytest.fixture
def llama3(tmp_path):
    write_llama3_tree(tmp_path / "remote")
    with LlamaMirror(tmp_path / "remote") as mirror:
        yield mirror


# --- the folders the library loads -----------------------------------------------------------


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_llama2_models_land_in_llama_2_folders_with_tokenizer_on_top(tmp_path, llama2, fetcher):
    tools = make_tools(tmp_path / "bin", fetcher=fetcher)
    target = tmp_path / "weights"
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B,13B-chat", target), tools=tools)

    assert result.returncode == 0, result.stderr
    assert llama2.user_agents() == {"Wget" if fetcher == "wget" else "curl"}
    remote = llama2.root
    assert_same_files(target, remote, ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"])
    for model in ["7B", "13B-chat"]:
        folder = llama2_folder(model)
        assert_loads_as_checkpoint(target / folder, LLAMA2_SHARDS[model])
        assert_same_files(target / folder, remote / folder, ["params.json", "checklist.chk"])
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == ["llama-2-13b-chat", "llama-2-7b"]


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_llama3_models_land_in_meta_llama_3_folders_with_their_tokenizer(tmp_path, llama3, fetcher):
    tools = make_tools(tmp_path / "bin", fetcher=fetcher)
    target = tmp_path / "weights"
    result = run_download(tmp_path, llama3.url, env_for(llama3.url, 3, "8B-instruct,70B", target), tools=tools)

    assert result.returncode == 0, result.stderr
    assert_same_files(target, llama3.root, ["LICENSE", "USE_POLICY"])
    for model in ["8B-instruct", "70B"]:
        local, remote = target / LLAMA3_LOCAL[model], llama3.root / LLAMA3_REMOTE[model]
        assert_loads_as_checkpoint(local, LLAMA3_SHARDS[model])
        assert_same_files(local, remote, ["params.json", "tokenizer.model", "checklist.chk"])
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == ["Meta-Llama-3-70B", "Meta-Llama-3-8B-Instruct"]


def test_model_names_are_accepted_in_any_case_with_spaces_after_commas(tmp_path, llama2):
    target = tmp_path / "weights"
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7b-CHAT, 13b", target))

    assert result.returncode == 0, result.stderr
    assert_loads_as_checkpoint(target / "llama-2-7b-chat", 1)
    assert_loads_as_checkpoint(target / "llama-2-13b", 2)


def test_interactive_llama2_asks_url_generation_and_models_and_defaults_to_current_folder(tmp_path, llama2):
    here = tmp_path / "here"
    here.mkdir()
    result = run_download(tmp_path, llama2.url, stdin=f"{llama2.url}\n2\n7B-chat\n", cwd=here)

    assert result.returncode == 0, result.stderr
    assert "Enter the URL from email" in result.stderr
    assert "2 or 3" in result.stderr
    assert "7B,13B,70B,7B-chat,13B-chat,70B-chat" in result.stderr
    assert_loads_as_checkpoint(here / "llama-2-7b-chat", 1)
    assert (here / "tokenizer.model").is_file()
    assert (
        "torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir llama-2-7b-chat/ "
        "--tokenizer_path tokenizer.model --max_seq_len 512 --max_batch_size 6" in result.stdout
    )


def test_interactive_llama3_enter_downloads_every_model_of_the_generation(tmp_path, llama3):
    here = tmp_path / "here"
    here.mkdir()
    result = run_download(tmp_path, llama3.url, stdin=f"{llama3.url}\n3\n\n", cwd=here)

    assert result.returncode == 0, result.stderr
    for model, folder in LLAMA3_LOCAL.items():
        assert_loads_as_checkpoint(here / folder, LLAMA3_SHARDS[model])
    assert (
        "torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/ "
        "--tokenizer_path Meta-Llama-3-8B-Instruct/tokenizer.model" in result.stdout
    )
    assert "torchrun --nproc_per_node 8 example_text_completion.py --ckpt_dir Meta-Llama-3-70B/" in result.stdout


def test_environment_answers_only_the_questions_it_sets(tmp_path, llama3):
    target = tmp_path / "weights"
    env = {"PRESIGNED_URL": llama3.url, "TARGET_FOLDER": str(target)}
    result = run_download(tmp_path, llama3.url, env, stdin="3\n8b\n")

    assert result.returncode == 0, result.stderr
    assert "Enter the URL" not in result.stderr
    assert_loads_as_checkpoint(target / "Meta-Llama-3-8B", 1)


def test_unanswered_question_on_closed_stdin_names_the_variable_to_set(tmp_path, llama2):
    result = run_download(tmp_path, llama2.url, {"PRESIGNED_URL": llama2.url}, stdin="")

    assert result.returncode != 0
    assert "set LLAMA_VERSION" in result.stderr
    assert llama2.requests == []


def test_summary_names_the_target_folder_in_the_torchrun_command(tmp_path, llama2):
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "13B", Path("ckpts")))

    assert result.returncode == 0, result.stderr
    assert (
        "torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir ckpts/llama-2-13b/ "
        "--tokenizer_path ckpts/tokenizer.model" in result.stdout
    )
    assert str(tmp_path / "ckpts") in result.stdout


def test_md5_is_used_when_md5sum_is_missing(tmp_path, llama2):
    tools = make_tools(tmp_path / "bin", md5="md5")
    target = tmp_path / "weights"
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B", target), tools=tools)

    assert result.returncode == 0, result.stderr
    assert "consolidated.00.pth: OK" in result.stdout
    called = (tools / "md5.calls").read_text().splitlines()
    assert sorted(Path(p).name for p in called) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert_loads_as_checkpoint(target / "llama-2-7b", 1)


# --- interrupted downloads -------------------------------------------------------------------


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_next_run_resumes_a_shard_cut_off_mid_file(tmp_path, llama2, fetcher):
    tools = make_tools(tmp_path / "bin", fetcher=fetcher)
    target = tmp_path / "weights"
    shard = "llama-2-7b/consolidated.00.pth"
    size = (llama2.root / shard).stat().st_size
    env = env_for(llama2.url, 2, "7B", target, DOWNLOAD_TRIES="1")
    llama2.drop_always.add(shard)

    first = run_download(tmp_path, llama2.url, env, tools=tools)
    assert first.returncode != 0
    assert "run the script again" in first.stderr.lower()
    partial = (target / shard).stat().st_size
    assert 0 < partial < size

    llama2.drop_always.clear()
    second = run_download(tmp_path, llama2.url, env, tools=tools)
    assert second.returncode == 0, second.stderr
    assert llama2.requested(shard)[-1] == f"bytes={partial}-"
    assert md5(target / shard) == md5(llama2.root / shard)


def test_a_dropped_connection_is_resumed_within_the_same_run(tmp_path, llama3):
    target = tmp_path / "weights"
    shard = "8b_pre_trained/consolidated.00.pth"
    llama3.drop_first.add(shard)

    result = run_download(tmp_path, llama3.url, env_for(llama3.url, 3, "8B", target))

    assert result.returncode == 0, result.stderr
    ranges = llama3.requested(shard)
    assert len(ranges) == 2 and ranges[1] and ranges[1].startswith("bytes=")
    assert md5(target / "Meta-Llama-3-8B" / "consolidated.00.pth") == md5(llama3.root / shard)


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_running_again_after_success_keeps_the_files_and_verifies_them(tmp_path, llama2, fetcher):
    tools = make_tools(tmp_path / "bin", fetcher=fetcher)
    target = tmp_path / "weights"
    env = env_for(llama2.url, 2, "13B", target)
    assert run_download(tmp_path, llama2.url, env, tools=tools).returncode == 0

    again = run_download(tmp_path, llama2.url, env, tools=tools)

    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": OK") == 4  # tokenizer, two shards, params.json
    assert_loads_as_checkpoint(target / "llama-2-13b", 2)


# --- refusing garbage --------------------------------------------------------------------------


def test_expired_link_403_says_why_and_where_to_get_a_new_one(tmp_path, llama2):
    expired = llama2.url.replace(SIGNATURE, "EXPIREDSIG")
    target = tmp_path / "weights"
    result = run_download(tmp_path, expired, env_for(expired, 2, "7B", target))

    assert result.returncode != 0
    assert "403" in result.stderr and "expired" in result.stderr
    assert "other Llama generation" in result.stderr
    assert "https://llama.meta.com/llama-downloads/" in result.stderr
    assert "EXPIREDSIG" not in result.stdout + result.stderr
    assert not list(target.rglob("*"))


def test_html_page_as_checklist_stops_before_any_shard(tmp_path, llama2):
    llama2.html.add("llama-2-7b/checklist.chk")
    target = tmp_path / "weights"
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B", target))

    assert result.returncode != 0
    assert "HTML page instead of llama-2-7b/checklist.chk" in result.stderr
    assert not (target / "llama-2-7b" / "checklist.chk").exists()
    assert llama2.requested("llama-2-7b/consolidated.00.pth") == []


def test_html_page_as_shard_is_not_kept(tmp_path, llama3):
    shard = "70b_instruction_tuned/consolidated.03.pth"
    llama3.html.add(shard)
    target = tmp_path / "weights"
    result = run_download(tmp_path, llama3.url, env_for(llama3.url, 3, "70B-instruct", target))

    assert result.returncode != 0
    assert "HTML page instead of Meta-Llama-3-70B-Instruct/consolidated.03.pth" in result.stderr
    assert not (target / "Meta-Llama-3-70B-Instruct" / "consolidated.03.pth").exists()


def test_shard_failing_md5_is_named_removed_and_fetched_by_the_next_run(tmp_path, llama2):
    shard = llama2.root / "llama-2-13b" / "consolidated.01.pth"
    good = shard.read_bytes()
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    target = tmp_path / "weights"
    env = env_for(llama2.url, 2, "13B", target)

    result = run_download(tmp_path, llama2.url, env)

    assert result.returncode != 0
    assert "llama-2-13b/consolidated.01.pth" in result.stderr
    assert not (target / "llama-2-13b" / "consolidated.01.pth").exists()
    assert (target / "llama-2-13b" / "consolidated.00.pth").exists()

    shard.write_bytes(good)
    assert run_download(tmp_path, llama2.url, env).returncode == 0
    assert_loads_as_checkpoint(target / "llama-2-13b", 2)


def test_unknown_model_name_lists_the_valid_ones(tmp_path, llama2):
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B,9B", tmp_path / "weights"))

    assert result.returncode != 0
    assert "9B" in result.stderr
    assert "7B,13B,70B,7B-chat,13B-chat,70B-chat" in result.stderr
    assert llama2.requests == []


def test_model_of_the_other_generation_is_named_as_such(tmp_path, llama2):
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "8B-instruct", tmp_path / "weights"))

    assert result.returncode != 0
    assert "8B-instruct is a Llama 3 model" in result.stderr
    assert llama2.requests == []


def test_generation_other_than_2_or_3_is_refused(tmp_path, llama2):
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 4, "", tmp_path / "weights"))

    assert result.returncode != 0
    assert "not 2 or 3" in result.stderr
    assert llama2.requests == []


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda url: url.replace("*", ""), "no '*'"),
        (lambda url: url.split("://", 1)[1], "does not start with https://"),
        (lambda url: url.split("&Key-Pair-Id")[0], "cut off"),
    ],
    ids=["no-star", "no-scheme", "truncated"],
)
def test_mis_pasted_url_is_refused_before_any_request(tmp_path, llama2, mangle, message):
    url = mangle(llama2.url)
    result = run_download(tmp_path, url, env_for(url, 2, "7B", tmp_path / "weights"))

    assert result.returncode != 0
    assert message in result.stderr
    assert llama2.requests == []


def test_url_pasted_with_quotes_and_blanks_still_works(tmp_path, llama2):
    pasted = f'  "{llama2.url}" '
    result = run_download(tmp_path, llama2.url, env_for(pasted, 2, "7B", tmp_path / "weights"))

    assert result.returncode == 0, result.stderr


def test_target_folder_that_cannot_be_written_is_refused(tmp_path, llama2):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B", not_a_folder / "weights"))

    assert result.returncode != 0
    assert "cannot write to the target folder" in result.stderr
    assert llama2.requests == []


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_folder_in_the_way_of_a_shard_is_reported_before_downloading(tmp_path, llama2, fetcher):
    tools = make_tools(tmp_path / "bin", fetcher=fetcher)
    target = tmp_path / "weights"
    (target / "llama-2-7b" / "consolidated.00.pth").mkdir(parents=True)  # in the shard's way
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B", target), tools=tools)

    assert result.returncode != 0
    assert "cannot write llama-2-7b/consolidated.00.pth" in result.stderr
    assert "Retrying" not in result.stdout


def test_too_little_free_disk_for_the_models_is_refused(tmp_path, llama2):
    tools = make_tools(tmp_path / "bin", free_kb=20_000_000)  # 20 GB: enough for 7B, not 13B too
    env = env_for(llama2.url, 2, "7B,13B", tmp_path / "weights")
    result = run_download(tmp_path, llama2.url, env, tools=tools)

    assert result.returncode != 0
    assert "not enough free disk" in result.stderr
    assert llama2.requests == []
    assert run_download(tmp_path, llama2.url, {**env, "MODEL_SIZE": "7B"}, tools=tools).returncode == 0


def test_missing_wget_and_curl_is_explained(tmp_path, llama2):
    tools = make_tools(tmp_path / "bin", fetcher="wget" if shutil.which("wget") else "curl")
    for name in ("wget", "curl"):
        (tools / name).unlink(missing_ok=True)
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B", tmp_path / "weights"), tools=tools)

    assert result.returncode != 0
    assert "neither wget nor curl" in result.stderr


@pytest.mark.parametrize("name", [".", "..", "*.."])
def test_checklist_naming_the_folder_or_its_parent_is_refused(tmp_path, llama2, name):
    checklist = tmp_path / "remote" / "llama-2-7b" / "checklist.chk"
    checklist.write_text(checklist.read_text() + f"{'0' * 32}  {name}\n")
    result = run_download(tmp_path, llama2.url, env_for(llama2.url, 2, "7B", tmp_path / "weights"))

    assert result.returncode != 0
    assert "llama-2-7b/checklist.chk is not a list of md5 checksums" in result.stderr
    assert llama2.requested("llama-2-7b/consolidated.00.pth") == []


@pytest.mark.parametrize("fetcher", FETCHERS)
def test_brackets_and_braces_in_the_url_are_sent_as_they_are(tmp_path, llama2, fetcher):
    # curl reads [1-3] and {a,b} as URL ranges unless told not to: one file would be six requests.
    tools = make_tools(tmp_path / "bin", fetcher=fetcher)
    url = llama2.url.replace("Policy=xyz", "Policy=a[1-3]b{c,d}")
    result = run_download(tmp_path, url, env_for(url, 2, "7B", tmp_path / "weights", DOWNLOAD_TRIES="1"), tools=tools)

    assert result.returncode == 0, result.stderr
    assert llama2.requested("llama-2-7b/consolidated.00.pth") == [None]
    assert_loads_as_checkpoint(tmp_path / "weights" / "llama-2-7b", 1)
