#!/usr/bin/env bash
# Download Llama 2 or Llama 3 weights with the signed URL from Meta's email, into the folders
# the library loads, and verify them against Meta's md5 checklists.
#
#   bash download.sh      # asks for the URL, the Llama generation (2 or 3) and the models
#
# Each of these variables, when set, answers its question instead:
#   PRESIGNED_URL    the URL from the email (https://download.llamameta.net/*?Policy=...), with
#                    its `*`; it is valid for 24 hours and a few downloads. Never printed.
#   LLAMA_VERSION    2 or 3: the generation the URL is for.
#   MODEL_SIZE       comma-separated models, any letter case; empty means all of the generation.
#                      Llama 2: 7B,13B,70B,7B-chat,13B-chat,70B-chat
#                      Llama 3: 8B,8B-instruct,70B,70B-instruct
#   TARGET_FOLDER    where the model folders go (default: the current folder).
# And these change how it downloads:
#   DOWNLOAD_TRIES   attempts per file before giving up (default 5); each one resumes.
#   SKIP_DISK_CHECK  set to 1 to download even when `df` reports too little free space.
#
# Running it again resumes: weight shards continue from where they stopped, the small files are
# fetched anew, and every folder is checked with md5 again. A file that fails its checksum is
# removed, so the next run fetches it again. Exit status 0 means everything asked for is there
# and verified.
#
# Needs wget or curl, and md5sum or md5. Written for bash 3.2 (macOS): no associative arrays,
# no ${var,,}, no mapfile.

set -u -o pipefail
set -f # model names and paths are never globs

REQUEST_URL="https://llama.meta.com/llama-downloads/"

# One row per model: generation, name, local folder, remote folder, shards, approximate GB.
MODEL_TABLE="
2 7B            llama-2-7b                 llama-2-7b              1  13
2 13B           llama-2-13b                llama-2-13b             2  26
2 70B           llama-2-70b                llama-2-70b             8  138
2 7B-chat       llama-2-7b-chat            llama-2-7b-chat         1  13
2 13B-chat      llama-2-13b-chat           llama-2-13b-chat        2  26
2 70B-chat      llama-2-70b-chat           llama-2-70b-chat        8  138
3 8B            Meta-Llama-3-8B            8b_pre_trained          1  16
3 8B-instruct   Meta-Llama-3-8B-Instruct   8b_instruction_tuned    1  16
3 70B           Meta-Llama-3-70B           70b_pre_trained         8  141
3 70B-instruct  Meta-Llama-3-70B-Instruct  70b_instruction_tuned   8  141
"

# What differs between the generations apart from the models: the files at the top of the
# target folder, the files next to the shards in each model folder, and where the tokenizer is.
set_generation() {
    case $1 in
        2)
            TOP_FILES="LICENSE USE_POLICY.md tokenizer.model tokenizer_checklist.chk"
            TOP_CHECKLIST="tokenizer_checklist.chk"
            FOLDER_FILES="params.json"
            TOKENIZER_IN_MODEL_FOLDER=0
            ;;
        3)
            TOP_FILES="LICENSE USE_POLICY"
            TOP_CHECKLIST=""
            FOLDER_FILES="params.json tokenizer.model"
            TOKENIZER_IN_MODEL_FOLDER=1
            ;;
    esac
}

# --- output ----------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }
die() {
    printf 'Error: %s\n' "$1" >&2
    shift
    while [ $# -gt 0 ]; do # not "$@": bash 3.2 calls it unbound under set -u when empty
        printf '       %s\n' "$1" >&2
        shift
    done
    exit 1
}

lower() { printf '%s' "$1" | LC_ALL=C tr '[:upper:]' '[:lower:]'; }

# --- tools -----------------------------------------------------------------------------------

find_tools() {
    # WRITE_ERROR: the tool's exit status for "could not write the file", which retrying won't fix.
    if command -v wget >/dev/null 2>&1; then
        FETCHER=wget WRITE_ERROR=3
    elif command -v curl >/dev/null 2>&1; then
        FETCHER=curl WRITE_ERROR=23
    else
        die "neither wget nor curl is installed; one of them is needed to download." \
            "On macOS curl comes with the system; on Debian/Ubuntu: sudo apt-get install wget"
    fi
    if command -v md5sum >/dev/null 2>&1; then
        MD5_TOOL=md5sum
    elif command -v md5 >/dev/null 2>&1; then
        MD5_TOOL=md5
    else
        die "neither md5sum nor md5 is installed; one of them is needed to verify the download." \
            "On Debian/Ubuntu: sudo apt-get install coreutils; macOS has md5."
    fi
}

file_md5() {
    if [ "$MD5_TOOL" = md5sum ]; then
        md5sum "$1" | cut -d ' ' -f 1
    else
        md5 -q "$1"
    fi
}

# --- questions -------------------------------------------------------------------------------

# ask VARIABLE PROMPT: the variable's value when set, else one line read from stdin.
ask() {
    local answer=""
    if eval "[ -n \"\${$1+x}\" ]"; then
        eval "answer=\$$1"
    else
        printf '%s' "$2" >&2
        if ! IFS= read -r answer && [ -z "$answer" ]; then
            printf '\n' >&2
            die "no answer to \"$2\" (stdin is closed); set $1 to run without questions."
        fi
    fi
    ANSWER=$answer
}

read_url() {
    ask PRESIGNED_URL "Enter the URL from email: "
    local url=$ANSWER
    # Copying from a mail client often brings blanks, quotes or angle brackets along.
    url=$(printf '%s' "$url" | tr -d ' \t\r\n' | sed -e 's/^["'\''<]*//' -e 's/["'\''>]*$//')
    case $url in
        "") die "no URL given." "Paste the whole link from Meta's email; request one at $REQUEST_URL" ;;
        http://* | https://*) ;;
        *) die "the URL does not start with https:// (it looks mis-pasted)." \
            "Paste the whole link from Meta's email, starting with https://download.llamameta.net/" ;;
    esac
    case $url in
        *'*'*) ;;
        *) die "the URL has no '*' in it, so it cannot name the files to download." \
            "Copy the link from the email itself (not a link your mail client rewrote or shortened)," \
            "or request a new one at $REQUEST_URL" ;;
    esac
    case $url in
        *Signature=*Key-Pair-Id=* | *Key-Pair-Id=*Signature=*) ;;
        *) die "the URL lacks its Signature or Key-Pair-Id: it was probably cut off when copied." \
            "Paste the whole link from the email (it is several lines long in some mail clients)." ;;
    esac
    # Split once at the first `*` so that each file's URL is URL_HEAD + remote path + URL_TAIL.
    URL_HEAD=${url%%\**}
    URL_TAIL=${url#*\*}
}

read_generation() {
    ask LLAMA_VERSION "Which Llama generation is this URL for? Enter 2 or 3: "
    local answer
    answer=$(lower "$ANSWER" | tr -d ' \t-')
    case $answer in
        2 | llama2) GENERATION=2 ;;
        3 | llama3) GENERATION=3 ;;
        *) die "Llama generation '$ANSWER' is not 2 or 3." \
            "Meta's email says which generation the link is for; set LLAMA_VERSION=2 or LLAMA_VERSION=3." ;;
    esac
    set_generation "$GENERATION"
}

# models_of GENERATION: the model names of a generation, comma-separated.
models_of() {
    local gen name rest list=""
    while read -r gen name rest; do
        [ "$gen" = "$1" ] && list="$list,$name"
    done <<EOF
$MODEL_TABLE
EOF
    printf '%s' "${list#,}"
}

# find_model GENERATION NAME: sets MODEL_NAME, MODEL_DIR, REMOTE_DIR, SHARDS, SIZE_GB from the
# table, matching the name in any letter case; returns 1 when the generation has no such model.
find_model() {
    local want gen name dir remote shards gb
    want=$(lower "$2")
    while read -r gen name dir remote shards gb; do
        if [ "$gen" = "$1" ] && [ "$(lower "$name")" = "$want" ]; then
            MODEL_NAME=$name MODEL_DIR=$dir REMOTE_DIR=$remote SHARDS=$shards SIZE_GB=$gb
            return 0
        fi
    done <<EOF
$MODEL_TABLE
EOF
    return 1
}

read_models() {
    local all name other
    all=$(models_of "$GENERATION")
    ask MODEL_SIZE "Enter the list of models to download without spaces ($all), or press Enter for all: "
    local answer
    answer=$(printf '%s' "$ANSWER" | tr -d ' \t\r')
    [ -n "$answer" ] || answer=$all
    MODELS=""
    for name in $(printf '%s' "$answer" | tr ',' ' '); do
        if ! find_model "$GENERATION" "$name"; then
            other=$((5 - GENERATION))
            if find_model "$other" "$name"; then
                die "$name is a Llama $other model, but the URL was said to be for Llama $GENERATION." \
                    "Llama $GENERATION models: $all. Set LLAMA_VERSION=$other if the URL is for Llama $other."
            fi
            die "unknown model '$name' for Llama $GENERATION." "Valid models: $all"
        fi
        case " $MODELS " in
            *" $MODEL_NAME "*) ;;
            *) MODELS="$MODELS $MODEL_NAME" ;;
        esac
    done
    MODELS=${MODELS# }
}

# --- target folder and disk ------------------------------------------------------------------

prepare_target() {
    TARGET=${TARGET_FOLDER:-.}
    [ "$TARGET" = / ] || TARGET=${TARGET%/}
    local probe="$TARGET/.download-write-test.$$"
    if ! mkdir -p "$TARGET" 2>/dev/null || ! (: >"$probe") 2>/dev/null; then
        die "cannot write to the target folder '$TARGET'." \
            "Choose a folder you can write to with TARGET_FOLDER=/path/to/folder"
    fi
    rm -f "$probe"
}

# Free space is checked up front: running out half-way through a 140 GB model wastes a link.
check_disk() {
    [ "${SKIP_DISK_CHECK:-0}" = 1 ] && return 0
    local name need_kb=0 have_kb used_kb
    for name in $MODELS; do
        find_model "$GENERATION" "$name"
        need_kb=$((need_kb + SIZE_GB * 1000000000 / 1024))
        if [ -d "$TARGET/$MODEL_DIR" ]; then
            used_kb=$(du -sk "$TARGET/$MODEL_DIR" 2>/dev/null | cut -f 1)
            case $used_kb in '' | *[!0-9]*) used_kb=0 ;; esac
            need_kb=$((need_kb - used_kb))
        fi
    done
    have_kb=$(df -Pk "$TARGET" 2>/dev/null | awk 'NR == 2 { print $4 }')
    case $have_kb in '' | *[!0-9]*) return 0 ;; esac # size unknown: nothing to compare
    if [ "$need_kb" -gt "$have_kb" ]; then
        die "not enough free disk in '$TARGET' for $MODELS:" \
            "about $((need_kb / 1000000)) GB more are needed and $((have_kb / 1000000)) GB are free." \
            "Free some space or choose another TARGET_FOLDER (SKIP_DISK_CHECK=1 skips this check)."
    fi
}

# --- downloading -----------------------------------------------------------------------------

looks_like_html() {
    local first
    first=$(head -c 1024 "$1" 2>/dev/null | LC_ALL=C tr -d '\000' | LC_ALL=C awk 'NF { print substr($0, 1, 32); exit }')
    first=$(lower "$first" | tr -d ' \t\r')
    case $first in
        '<!doctype'* | '<html'* | '<head'* | '<?xml'*) return 0 ;;
    esac
    return 1
}

link_refused() {
    die "the server refused the link (HTTP 403) while fetching $1." \
        "The link has expired (it is valid for 24 hours), has been used for too many downloads," \
        "or is for the other Llama generation (this run asked for Llama $GENERATION files)." \
        "Request a new link at $REQUEST_URL and paste it whole."
}

html_instead_of() {
    die "the server sent an HTML page instead of $1 (nothing was kept)." \
        "The link was probably mis-pasted, or a proxy or captive portal answered instead of Meta." \
        "Check the link, or request a new one at $REQUEST_URL"
}

# run_fetcher URL FILE RESUME: one attempt. Sets HTTP_STATUS (empty when no answer came) and
# returns the tool's exit status. A progress bar goes to a terminal; the tool's own messages do
# not, because wget's carry the signed URL.
run_fetcher() {
    local status=0 progress=0 resume=""
    [ -t 2 ] && progress=1
    HTTP_STATUS=""
    if [ "$FETCHER" = wget ]; then
        [ "$3" = 1 ] && resume="--continue"
        if [ "$progress" = 1 ]; then progress="--show-progress"; else progress="--no-verbose"; fi
        # shellcheck disable=SC2086 # $resume is zero or one word
        wget $resume --tries=1 --timeout=60 --no-verbose "$progress" -o "$WORK_DIR/log" -O "$2" "$1" || status=$?
        [ "$status" = 8 ] && HTTP_STATUS=$(sed -n 's/.*ERROR \([0-9][0-9][0-9]\).*/\1/p' "$WORK_DIR/log" | head -n 1)
        rm -f "$WORK_DIR/log"
    else
        [ "$3" = 1 ] && resume="--continue-at -"
        if [ "$progress" = 1 ]; then progress="--progress-bar"; else progress="--silent"; fi
        # shellcheck disable=SC2086 # $resume is zero or two words
        # --globoff: [] and {} in a signed URL are characters, not curl's URL ranges. (wget has no such syntax.)
        HTTP_STATUS=$(curl $resume --globoff --fail --location --connect-timeout 60 --speed-limit 1 --speed-time 120 \
            "$progress" --output "$2" --write-out '%{http_code}' "$1") || status=$?
        case $status in 0 | 22) ;; *) HTTP_STATUS="" ;; esac
    fi
    return "$status"
}

# fetch REMOTE_PATH LOCAL_FILE: download one file, resuming weight shards, retrying lost
# connections. Stops the script on answers that retrying cannot fix.
fetch() {
    local remote=$1 dest=$2 label=${2#"$TARGET"/} resume=0 file attempt=1 status
    local tries=${DOWNLOAD_TRIES:-5}
    case $tries in '' | *[!0-9]* | 0) tries=5 ;; esac
    case $dest in *.pth) resume=1 ;; esac
    file=$dest
    if [ "$resume" = 1 ]; then
        # A partial shard that is an error page would be extended rather than replaced.
        if [ -s "$dest" ] && looks_like_html "$dest"; then rm -f "$dest"; fi
    else
        file="$dest.part"
        rm -f "$file"
    fi
    [ -d "$file" ] && die "cannot write ${file#"$TARGET"/}: a folder of that name is in the way." \
        "Move it away, then run the script again."
    say "Downloading $label"
    while :; do
        status=0
        run_fetcher "$URL_HEAD$remote$URL_TAIL" "$file" "$resume" || status=$?
        [ "$status" = 0 ] && break
        [ -s "$file" ] || rm -f "$file" # wget leaves an empty file behind on errors
        if [ "$status" = "$WRITE_ERROR" ]; then
            die "cannot write $label (is the disk full?)." \
                "Free some space or choose another TARGET_FOLDER, then run the script again."
        fi
        case $HTTP_STATUS in
            403) link_refused "$label" ;;
            416) # asked to resume past the end: the file was complete already
                if [ "$resume" = 1 ] && [ -s "$file" ]; then
                    say "  already complete"
                    break
                fi
                ;;
            404) die "the server has no $remote (HTTP 404)." \
                "Is the link for Llama $GENERATION? Meta's email says which generation it is for." ;;
            4??) die "the server answered HTTP $HTTP_STATUS for $label." \
                "Request a new link at $REQUEST_URL" ;;
        esac
        if [ "$attempt" -ge "$tries" ]; then
            if [ "$resume" = 1 ] && [ -s "$file" ]; then
                die "the download of $label stopped after $attempt tries (lost connection)." \
                    "Run the script again with the same link to continue where it stopped."
            fi
            die "could not download $label after $attempt tries${HTTP_STATUS:+ (HTTP $HTTP_STATUS)}." \
                "Check the network connection and run the script again."
        fi
        [ "$attempt" -ge 2 ] && sleep $((5 * (attempt - 1)))
        attempt=$((attempt + 1))
        say "Retrying $label (try $attempt of $tries)"
    done
    if looks_like_html "$file"; then
        rm -f "$file"
        html_instead_of "$label"
    fi
    if [ "$file" != "$dest" ]; then
        mv -f "$file" "$dest" || die "cannot write $dest."
    fi
}

# --- verifying -------------------------------------------------------------------------------

# The names in a checklist, after checking that every line is md5sum output for a plain file name.
checklist_names() {
    local chk=$1
    if looks_like_html "$chk"; then
        rm -f "$chk"
        html_instead_of "${chk#"$TARGET"/} (an md5 checklist)"
    fi
    if ! LC_ALL=C awk '
            { sub(/\r$/, "") }
            NF == 0 { next }
            NF != 2 || length($1) != 32 || $1 !~ /^[0-9a-fA-F]+$/ || $2 !~ /^[*]?[A-Za-z0-9._-]+$/ { bad = 1; exit }
            $2 ~ /^[*]?[.][.]?$/ { bad = 1; exit } # the folder itself or its parent
            { n++ }
            END { exit (bad || n == 0) }' "$chk"; then
        rm -f "$chk"
        die "${chk#"$TARGET"/} is not a list of md5 checksums (it was removed)." \
            "The server sent something else; run the script again, or request a new link at $REQUEST_URL"
    fi
    LC_ALL=C awk '{ sub(/\r$/, "") } NF == 2 { sub(/^\*/, "", $2); print $2 }' "$chk"
}

# verify DIR CHECKLIST: compare every listed file with its md5. A file that differs is removed,
# so that the next run fetches it again, and is added to FAILED.
verify() {
    local dir=$1 chk=$2 sum name actual rel where=${1#"$TARGET"/}
    [ "$dir" = "$TARGET" ] && where=$TARGET
    say "Checking $where with $chk"
    while read -r sum name; do
        [ -n "$name" ] || continue
        name=${name#\*}
        rel="${dir#"$TARGET"/}/$name"
        [ "$dir" = "$TARGET" ] && rel=$name
        if [ ! -f "$dir/$name" ]; then
            say "  $name: MISSING"
            FAILED="$FAILED $rel"
            continue
        fi
        actual=$(file_md5 "$dir/$name")
        if [ "$(lower "$actual")" = "$(lower "$sum")" ]; then
            say "  $name: OK"
        else
            say "  $name: FAILED (md5 mismatch, removed)"
            rm -f "$dir/$name"
            FAILED="$FAILED $rel"
        fi
    done <<EOF
$(tr -d '\r' <"$dir/$chk")
EOF
}

# --- the two parts of a download -------------------------------------------------------------

download_top_files() {
    local name
    for name in $TOP_FILES; do
        fetch "$name" "$TARGET/$name"
    done
    if [ -n "$TOP_CHECKLIST" ]; then
        checklist_names "$TARGET/$TOP_CHECKLIST" >/dev/null
        verify "$TARGET" "$TOP_CHECKLIST"
    fi
}

download_model() {
    find_model "$GENERATION" "$1"
    local dir="$TARGET/$MODEL_DIR" files="" name i=0 listed
    mkdir -p "$dir" || die "cannot create $dir."
    # The checklist comes first: an error page in its place stops the run before the shards.
    fetch "$REMOTE_DIR/checklist.chk" "$dir/checklist.chk"
    listed=$(checklist_names "$dir/checklist.chk") || exit 1
    while [ "$i" -lt "$SHARDS" ]; do
        files="$files consolidated.$(printf '%02d' "$i").pth"
        i=$((i + 1))
    done
    files="$files $FOLDER_FILES"
    for name in $listed; do # anything else Meta lists is fetched too
        case " $files " in *" $name "*) ;; *) files="$files $name" ;; esac
    done
    for name in $files; do
        fetch "$REMOTE_DIR/$name" "$dir/$name"
    done
    verify "$dir" checklist.chk
}

# --- summary ---------------------------------------------------------------------------------

print_summary() {
    local prefix="" name script args tokenizer
    [ "$TARGET" = . ] || prefix="$TARGET/"
    say ""
    say "Downloaded and verified Llama $GENERATION into $(cd "$TARGET" && pwd):"
    for name in $MODELS; do
        find_model "$GENERATION" "$name"
        say "  $MODEL_DIR/ ($SHARDS shard$([ "$SHARDS" = 1 ] || printf s))"
    done
    say "  ${TOP_FILES// /, }"
    say ""
    say "Run a model with (paths relative to the folder download.sh ran in):"
    for name in $MODELS; do
        find_model "$GENERATION" "$name"
        case $MODEL_NAME in
            *-chat | *-instruct)
                script=example_chat_completion.py args="--max_seq_len 512 --max_batch_size 6" ;;
            *)
                script=example_text_completion.py args="--max_seq_len 128 --max_batch_size 4" ;;
        esac
        if [ "$TOKENIZER_IN_MODEL_FOLDER" = 1 ]; then
            tokenizer="$prefix$MODEL_DIR/tokenizer.model"
        else
            tokenizer="${prefix}tokenizer.model"
        fi
        say "  torchrun --nproc_per_node $SHARDS $script --ckpt_dir $(printf '%q' "$prefix$MODEL_DIR")/ --tokenizer_path $(printf '%q' "$tokenizer") $args"
    done
}

main() {
    find_tools
    read_url
    read_generation
    read_models
    prepare_target
    check_disk

    WORK_DIR=$(mktemp -d 2>/dev/null || mktemp -d -t llama-download) || die "cannot create a temporary folder."
    trap 'rm -rf "$WORK_DIR"' EXIT
    trap 'warn ""; warn "Interrupted. Run the script again with the same link to continue."; exit 130' INT TERM

    FAILED=""
    download_top_files
    local name
    for name in $MODELS; do
        download_model "$name"
    done

    if [ -n "$FAILED" ]; then
        die "these files failed their md5 check and were removed:$FAILED" \
            "Run the script again with the same link to fetch them again."
    fi
    print_summary
}

main
