//! Generic frames that wrap a resource into a request, a negation, a mention or a later need, and the
//! framings of each note type (headers, pager openers, handover prefixes, sign-offs).
//!
//! `<r>` is the focused resource's bare name and `<ar>` the same with an optional article.

use super::template::Bank;

/// Device requests for machine time that is booked rather than brought: scans, dialysis, EEG.
pub(super) const ASK_DEVICE_SLOT: Bank = &[
    "{pls|please} book <r>",
    "book <r> {today|}",
    "slot for <r> {please|today}",
    "{requesting|request} <r> {- <reason>|}",
    "{pls|please} {arrange|book} <r> {for <ref>|today|}",
    "{need|needs} <r> {today|tonight|asap}",
    "{can|could} we get <ar> {today|this afternoon}?",
    "{any|is there a} slot for <r> {today|tomorrow am}?",
    "<r> {pls|please} - {urgent|routine|today}",
];

/// Requests that read right for any resource.
pub(super) const ASK_COMMON: Bank = &[
    "needs <r>",
    "needs <r> {pls|please|asap|today|}",
    "{pls|please} arrange <r>",
    "{pls|please} organise <r> {today|asap|}",
    "requesting <r>",
    "request: <r>",
    "<r> {please|pls|plz}",
    "<r> {required|needed} {today|now|asap|urgently|this am|before 5pm|}",
    "{could|can} we {get|have} <ar>{ please| pls|}?",
    "for <r>",
    "would be grateful for <ar>",
    "{need|needs} <r> {urgently|today|asap}",
    "urgent <r> {please|pls|needed}",
    "{pls|please} can you organise <ar>",
    "kindly arrange <r>",
    "requires <r> {today|}",
    "will need <r> today",
    "{is there|any chance of} <ar> {today|this afternoon|}?",
    "<r> ASAP",
    "ask is for <ar>",
    "{main|the} ask: <r>",
    "{pls|please} sort <r> {for <ref>|today|}",
    "{we|I} need <ar> {for this pt|for <ref>|}",
    "{need|needs} <ar> {sorting|arranging} {today|pls}",
];

/// Requests phrased as a question, for pager and chat messages.
pub(super) const ASK_QUESTION: Bank = &[
    "{could|can} you {arrange|organise} <ar>{ please| pls|}?",
    "any chance of <ar> {today|this pm|}?",
    "{is it possible to|can we} {get|arrange} <ar>?",
    "would you be able to {arrange|sort} <ar>?",
    "{could|can} we {please|} {get|have} <ar> {for <ref>|today|}?",
    "are you able to {help with|sort} <ar>?",
];

/// Requests as bare order lines: "CT head: ...", "Referral: dietitian".
pub(super) const ASK_BARE: [Bank; 4] = [
    &["Consult: <teamm>", "<teamm> consult", "<teamm> r/v", "Referral to <team>", "Consult <teamm> - pls see", "r/v by <who>"],
    &["Admit: <r>", "Bed: <r>", "Bed request - <r>", "<r> please", "Admission: <r>"],
    &["<r>", "<r>", "<r> -", "Request: <r>", "<r> pls", "<r> please", "<r> (urgent)"],
    &["Request: <r>", "<r> pls", "<r> - please", "<r> needed", "Re: <r>"],
];

/// Label-specific requests, indexed by `Label::index`.
pub(super) const ASK_LABEL: [Bank; 4] = [
    // doctor
    &[
        "{pls|please} r/v",
        "{pls|please} {come and|} see {pt|<ref>}",
        "{pls|please} review {<ref>|pt} {asap|today|}",
        "<who> to {r/v|see|assess} {pls|please|}",
        "{could|can} <who> {please|} review?",
        "refer to <team>",
        "needs to be seen by <who>",
        "for r/v by <who>",
        "{can|could} someone {r/v|review|see} {pt|<ref>} {pls|please|}?",
        "{needs|need} <who> {to see|to r/v|urgently}",
        "{awaiting|waiting for} <who> to {r/v|see} - {pls|please} chase",
        "{escalate|escalating} to <who> {pls|please|}",
        "{request|requesting} <teamm> r/v",
        "r/v {please|pls} {- <reason>|}",
        "{pls|please} assess {pt|<ref>} {asap|}",
        "{needs|for} {an urgent|a same-day|a} {review|assessment} by <who>",
        "{could|can} you {come and|} {r/v|review|see} {pt|<ref>}{ please|}?",
        "are you able to {come and see|review} {<ref>|pt} {soon|asap|}?",
        "{would you mind reviewing|would you be able to see|could you see} {<ref>|pt} {when free|asap}?",
        "<who> to <loc> {pls|please|asap|}",
        "<who> {pls|please} - <loc>",
        "<teamm> {pls|please}: {<loc>|<ref>}",
        "<who> {needed|wanted} {at|in} <loc>",
        "{need|needs} <who> {here|on the ward|at the bedside} {now|asap|}",
        "{can|could} <who> {call|ring} {the ward|back} {re <ref>|}?",
        "{pls|please} {call|ring|bleep} <who> {re <ref>|}",
        "<who> {to advise|for advice} {re <ref>|on management|}",
        "{over to|for} <who> {pls|please}",
        "{attending|resident|hospitalist|intern} {pls|please} {- <loc>|}",
    ],
    // bed
    &[
        "needs admission",
        "needs a bed {tonight|today|asap|}",
        "{for|needs} admission to <r>",
        "{pls|please} find <ar>",
        "looking for <ar> {for <ref>|}",
        "any <r> available?",
        "bed request: <r>",
        "{pls|please} allocate <ar>",
        "needs to go up to <r>",
        "needs transfer to <r>",
        "{awaiting|waiting for} <ar> {- pls chase|}",
        "{need|needs} <ar> {today|tonight|asap}",
        "{can|could} we have <ar> {please|pls|}?",
        "{is there|any} <r> {free|available}?",
        "{admit|admission} {pls|please} - <r>",
        "bed please - <r>",
        "{pls|please} {expedite|chase} <r> {- been waiting 8h|}",
    ],
    // device (equipment; bookable slots use ASK_DEVICE_SLOT)
    &[
        "{pls|please} set up <r>",
        "{pls|please} send <ar> to {<ward>|<loc>}",
        "<r> to be set up {today|asap}",
        "{can|could} we {borrow|get} <ar> {from ICU|from another ward|}?",
        "{pls|please} {bring|get} <ar> {asap|now|}",
        "{is there|any} <r> {free|available} {on site|}?",
        "{requesting|request} <r> {- <reason>|}",
        "{need|needs} <r> {set up|started} {today|now}",
        "{pls|please} arrange <r> {for <ref>|}",
        "{need|needs} a spare <r>",
    ],
    // other
    &[
        "{pls|please} {sort|chase} <r> {today|before d/c|}",
        "{needs|need} <r> {sorted|arranged} {before d/c|today}",
        "<r> {outstanding|still outstanding} - {pls|please} {chase|sort}",
        "{waiting on|awaiting} <r> {- pls chase|}",
        "{pls|please} {arrange|organise} <r> {for <ref>|}",
        "{only thing|the only thing} outstanding is <r>",
    ],
];

/// Short requests that follow a connective: "no bed needed, just <this>".
pub(super) const ASK_SHORT: Bank =
    &["needs <r>", "<r>", "requires <r>", "needs <r> {today|though|}", "<r> {please|pls}", "wants <r>", "needs <r> {asap|}"];

/// Connectives between a negation and the real request.
pub(super) const NEG_CONNECT: Bank =
    &[", just", " - just", ", only", ", but", "; just", ". Just", " - only", ", but still", " - but", ". Only", "; only", ". But"];

/// Negations of the focused resource.
pub(super) const NEG_GENERIC: Bank = &[
    "no <r> {needed|required}",
    "{doesn't|does not} need <r>",
    "<r> not {needed|required|indicated} {at present|now|}",
    "no need for <r>",
    "{reg|cons|team} {says|feels} no <r> needed",
    "<r> {cancelled|no longer needed}",
    "not {asking for|requesting} <r>",
    "{no longer needs|doesn't need} <r> {now|anymore|}",
    "{NOT|not} for <r>",
    "hold off on <r>",
    "<r> on hold {for now|}",
    "decided against <r>",
    "{pt|family} declined <r>",
    "<r> {not necessary|unnecessary} {now|}",
];

/// Non-request mentions of the focused resource: it is done, arranged or already in place.
pub(super) const MENTION_GENERIC: Bank =
    &["<r> {already|} {arranged|sorted|done|booked} {earlier|this am|yesterday|}", "<r> {arranged|sorted} {- thanks|already}"];
/// "Had it already" mentions; not for beds.
pub(super) const MENTION_HAD: Bank = &["{has had|already had} <r> {today|this am|}", "<r> {done|completed} {earlier|this am|yesterday}"];

/// Location-only mentions: a bed number is where the patient is, not what is asked for.
pub(super) const MENTION_LOCATION: Bank = &["{pt|patient} in <loc>", "<loc>", "{currently|} in <loc>", "<loc> pt", "re <ref> in <loc>"];

/// A second, lower-priority resource that is not the ask now.
pub(super) const SECONDARY: Bank = &[
    "{may|might} need <r> {later|if deteriorates|in due course|tomorrow}",
    "will need <r> {at some point|later this week|before d/c} - not urgent",
    "<r> can wait {till tomorrow|until Monday|for now}",
    "{?|query} <r> {later|tomorrow|in a few days}",
    "{consider|will consider} <r> if {no improvement|deteriorates|worsens}",
    "then <r> once {stable|settled}",
    "{also|and} <r> at some point but {not urgent|no rush}",
    "{possibly|maybe} <r> {later|down the line}, {not now|not today}",
    "<r> {later|afterwards} {if needed|if required}",
];

/// Conditional later needs, for resources nobody plans ahead (ventilators, ICU beds, a defib).
pub(super) const SECONDARY_IF: Bank = &[
    "{may|might} need <r> if {deteriorates|worsens|no better}",
    "{consider|will consider} <r> if {no improvement|deteriorates|worsens}",
    "{?|query} <r> if {tires|gets worse}",
    "<r> only if {deteriorates|needed}",
    "low threshold for <r> {if worse|overnight}",
];

/// Later needs that only make sense for things booked, not beds.
pub(super) const SECONDARY_BOOKED: Bank = &[
    "<r> as {outpatient|OP} {later|in due course}",
    "<r> {next week|tomorrow} {- non-urgent|- routine}",
    "{also|and} <r> before d/c {- not urgent|- no rush}",
];

/// Prefixes that mark the primary request when a secondary one follows.
pub(super) const PRIORITY: Bank = &["Priority:", "Main ask:", "Most urgent:", "First:", "Priority -", "Urgent:", "Main issue -", "Now:"];
pub(super) const PRIORITY_CALM: Bank = &["Main ask:", "First:", "Priority -", "Main issue -", "Today:", "For now:"];

/// "Does this patient need X?" aimed at a doctor: the ask is the review, not X.
pub(super) const REVIEW_DECIDE: Bank = &[
    "<who> to {r/v|assess} {re|for} <q>",
    "{pls|please} {r/v|review} {re|-} <q>",
    "needs {<teamm>|senior} {r/v|review} {re|to decide on} <q>",
    "<who> {pls|please} {assess|r/v} {- <q>|for <q>}",
    "<q> - {pls|please} {r/v|review|assess}",
    "{can|could} <who> {assess|review} {pt|<ref>} {re|for} <q>?",
    "{needs|for} <teamm> {opinion|r/v} {re|regarding} <q>",
    "{pls|please} ask <who> to see {re|-} <q>",
    "{asking|ask} <who> to {come and|} assess {- <q>|re <q>}",
];

/// Requests that name their purpose: "<ask> for <reason>".
pub(super) const REASON_LINK: Bank = &[" -", " for", " re", " as", ",", ";", " ("];

pub(super) const ED_HEADERS: Bank = &[
    "ED triage:",
    "Triage:",
    "A&E triage -",
    "ER triage:",
    "Triage note:",
    "Cat {2|3} -",
    "ATS {2|3}:",
    "MTS {orange|yellow|red} -",
    "ESI {2|3}:",
    "Triage RN:",
    "Majors:",
    "ED:",
    "ED nurse triage -",
    "Streaming:",
    "Resus:",
];
pub(super) const ED_MAIN: Bank = &[
    "<pt> <pres>",
    "<pt>, <pres>",
    "<pt> {BIBA|self-presented|walk-in|sent in by GP|BIBA from NH|self-referred} - <pres>",
    "<pt> <pres>, {likely|imp:|working dx|impression} <dx>",
    "<pt> with <dx>",
    "<pt> {known|PMH} <hx>, now <pres>",
    "<pt> presenting with <pres>",
    "<pt> attends with <pres>",
    "<pt> {PC|P/C}: <pres>",
    "<pt> {brought in by|with} <parent>, <pres>",
    "<pt> {referred in|sent in} by GP with <pres>",
];
pub(super) const HX_PREFIX: Bank = &["PMH", "PMHx", "Hx", "bg", "Background:", "PMH:", "known", "hx of", "BG:", "k/c/o"];
pub(super) const WR_HEADERS: Bank = &[
    "WR:",
    "Ward round:",
    "WR (cons):",
    "Post-take WR:",
    "PTWR:",
    "<day> WR -",
    "Consultant WR:",
    "AM round:",
    "Rounds:",
    "Progress note:",
    "WR <dr>:",
    "Board round:",
    "Reg WR -",
    "Wk/end WR:",
];
pub(super) const WR_PROGRESS: Bank = &[
    "{improving|slowly improving|no better|worse} {overnight|since yesterday}",
    "{obs stable|afebrile|apyrexial} {overnight|24h}",
    "{eating|mobilising} {well|better|poorly}",
    "{bloods improving|CRP falling|creat improving|Hb stable}",
    "{remains|still} {on 2L O2|confused|NBM}",
    "{day <n> abx|D3 IV abx}",
    "{pain controlled|pain better|pain worse}",
    "{comfortable|settled} {this am|overnight}",
    "{spiked overnight|new temp overnight}",
    "{family updated|NOK updated} {yesterday|this am}",
];
pub(super) const PLAN_PREFIX: Bank = &["Plan:", "Plan -", "P:", "Plan", "Imp/plan:", "Action:", "Jobs:", "Today:", "To do:"];
pub(super) const NURSE_HEADERS: Bank = &[
    "Nursing note:",
    "RN note:",
    "Nursing:",
    "Night staff:",
    "Obs round:",
    "NIC:",
    "Charge nurse -",
    "Nursing entry <time>:",
    "Shift update:",
    "<time> -",
    "Nurse:",
    "Evening shift:",
];
pub(super) const NURSE_OBS: Bank = &[
    "<ref> {c/o|complaining of} {pain 8/10|increasing SOB|nausea|chest tightness}",
    "{more|increasingly} {drowsy|confused|agitated} {this pm|overnight|since <time>}",
    "{not PU|hasn't PU} {since <time>|all shift}",
    "{refusing|declined} {meds|obs|diet} {this am|}",
    "{fall on ward|fell in bathroom} {at <time>|this am}, {no head injury|hit head}",
    "{obs stable|obs within normal limits}",
    "{settled|comfortable} {overnight|this shift}",
    "{eating and drinking|tolerating diet} {well|poorly}",
    "{family|daughter|son} {visited|called} {and|-} {concerned|asking questions}",
    "<ref> {pulled out cannula|pulled out NG}",
    "{vomited x2|vomiting} {this shift|since <time>}",
    "{skin red|skin broken} on {sacrum|heels}",
    "<ref> {tearful|low in mood} {today|this evening}",
];
pub(super) const ORDER_HEADERS: Bank = &[
    "Order comment:",
    "Req:",
    "Request:",
    "Order:",
    "Clinical details:",
    "Indication:",
    "Reason for request:",
    "Clin info:",
    "Request form -",
    "Order note:",
];
pub(super) const HANDOVER_HEADERS: Bank = &[
    "Handover:",
    "H/O -",
    "Night handover:",
    "SBAR:",
    "ISBAR -",
    "Weekend handover:",
    "H@N list:",
    "Jobs list:",
    "Evening handover -",
    "Handover to nights:",
    "Day team handover:",
];
pub(super) const HANDOVER_STATUS: Bank = &[
    "{stable|settled|unchanged} {today|this pm|}",
    "{still|remains} {unwell|sick|on 15L}",
    "{bloods|gas} {due at <time>|to chase}",
    "{watch|keep an eye on} {UO|obs|K|BMs}",
    "{DNACPR|for full escalation}",
    "{improving|better} {today|since abx}",
    "{family aware|NOK aware}",
];
pub(super) const HANDOVER_JOBS: Bank =
    &["Jobs:", "Outstanding:", "To do:", "TODO:", "Pending:", "Needs:", "Action:", "Issue:", "Job -", "Outstanding -"];
pub(super) const BED_HEADERS: Bank = &[
    "To bed manager:",
    "Bed manager -",
    "@bed mgmt",
    "Patient flow:",
    "Site team:",
    "Flow coordinator:",
    "Bed bureau:",
    "Capacity hub:",
    "Hi bed team,",
    "For site manager:",
    "Bed meeting:",
    "Msg to bed manager:",
    "Transfer coordinator:",
];
pub(super) const BED_WHERE: Bank = &[
    "currently in {ED|A&E} <loc>",
    "{in|waiting in} {ED|majors|resus} <loc>",
    "{on|in} <ward> <loc>",
    "in {recovery|PACU}",
    "in {ED|ER} {since <time>|for 9h}",
];
pub(super) const PAGER_OPENERS: Bank = &[
    "Hi,",
    "Hi it's the nurse on <ward>,",
    "Bleep from <ward>:",
    "Page:",
    "Secure chat:",
    "Teams msg:",
    "Hi, {FY1|nurse|NIC|SHO|CSW} here on <ward>.",
    "Hello, <ward> here -",
    "Hi there,",
    "Bleep:",
    "Pager msg:",
    "Vocera:",
    "Text to on-call:",
    "Hi from <ward>,",
    "Hey,",
    "Sorry to bother you,",
];
pub(super) const PAGER_REF: Bank =
    &["re <ref> in <loc>", "{about|re} {pt|<ref>} in <loc>", "<ref> {in|on} <loc>", "<loc> - <pt>", "{pt|patient} <loc>"];
pub(super) const DP_HEADERS: Bank = &[
    "Discharge planning:",
    "D/C planning:",
    "MDT:",
    "Board round:",
    "EDD <day> -",
    "Discharge coordinator:",
    "Flow MDT:",
    "Ward MDT -",
    "DP note:",
    "Complex discharge:",
    "Discharge:",
    "D/C plan:",
];
pub(super) const DP_STATUS: Bank = &[
    "{MFFD|medically fit for discharge|medically optimised|RFD}",
    "EDD {today|tomorrow|Fri|<day>}",
    "{d/c|discharge} {today|tomorrow am|planned}",
    "{goes home to|lives with} {wife|daughter|husband}",
    "lives alone, {POC QDS|carers BD|independent}",
    "{back to baseline|at baseline mobility}",
    "{home|NH} {today|once sorted}",
    "{MFFD since yesterday|fit since Monday}",
    "{ready to go|ready for d/c} {today|this pm}",
];
pub(super) const DP_STATUS_CHILD: Bank = &[
    "{MFFD|medically fit for discharge|RFD}",
    "EDD {today|tomorrow|<day>}",
    "{d/c|discharge} {today|tomorrow am|planned}",
    "{going home with|lives with} {<parent>|parents|mum and siblings}",
    "{feeding well|back to normal feeds|eating and drinking}",
    "{home today|home once sorted}",
    "{ready to go|ready for d/c} {today|this pm}",
];
pub(super) const DP_HOLD: Bank = &[
    "{not yet fit for d/c|not MFFD|d/c on hold}",
    "{was for d/c today|planned d/c} but {spiked a temp|new O2 requirement|deteriorated overnight}",
    "EDD {slipped|pushed back} {to <day>|}",
    "{d/c|discharge} {delayed|cancelled} {- unwell|today}",
    "{not fit|not ready} for {home|discharge} {yet|today}",
    "{d/c paused|on hold} pending {bloods|review of obs}",
];
pub(super) const SIGN_OFFS: Bank = &[
    "thanks",
    "thx",
    "many thanks",
    "ta",
    "cheers",
    "thank you",
    "- <init>",
    "<ext>",
    "call <ext>",
    "thanks, <init> <ext>",
    "- FY1 <ext>",
    "- RN",
    "pls call back <ext>",
    "regards",
    "thanks in advance",
    "thanks!",
    "ta - <init>",
    "{NIC|ED NIC|charge nurse} <ext>",
    "- ward <n>",
];
pub(super) const URGENT_PREFIX: Bank = &["URGENT:", "Urgent -", "!!", "urgent:", "ASAP:", "Time critical -"];
pub(super) const ASK_SUFFIX_CALM: Bank =
    &[" pls", " please", " thanks", " if poss", " when able", " thx", " when you get a chance", " before d/c"];
pub(super) const ASK_SUFFIX: Bank = &[
    " pls",
    " please",
    " asap",
    " thanks",
    " - urgent",
    " (urgent)",
    " today if possible",
    " thx",
    " - time critical",
    " ideally today",
    " now please",
];

pub(super) const WR_MAIN: Bank = &[
    "<pt> <day> {with|-} <dx>",
    "<day> - <dx>",
    "<dx>, <day>",
    "<pt> adm with <dx>",
    "<pt>, <dx>",
    "<dx> - {improving|stable|slow progress}",
    "<pt> {admitted|adm} {{2/7|3 days|a week|4/7} ago|yesterday} with <dx>",
    "{Known|Bg} <hx>. Adm <dx>",
    "{Impression|Imp}: <dx>",
    "<pt>. <dx>. <hx>",
    "<pt> post <op>, <day>",
];
pub(super) const ORDER_PT: Bank =
    &["<pt>", "<pt> <dx>", "<pt> with <dx>", "<pt>, <pres>", "{Hx|Clinical hx}: <pres>", "<dx>", "{for|in} <pt>"];
pub(super) const HANDOVER_MAIN: Bank = &[
    "<pt> <dx>",
    "<pt> {adm|admitted} with <dx>",
    "<dx>",
    "<pt>, <dx>, <day>",
    "<pt> - <dx> - <hx>",
    "new {adm|admission} <pt> <dx>",
    "<pt> post <op> {<day>|today}",
];
pub(super) const BED_MAIN: Bank = &[
    "<pt> with <dx>",
    "<pt> - <dx>",
    "<pt>, {adm|admitted} under <own_team> with <dx>",
    "for <pt> with <dx>",
    "{pt|patient} is <pt> with <dx>",
    "<pt> {referred to|under} <own_team> - <dx>",
    "re <pt> <dx>",
];
pub(super) const PAGER_CTX: Bank = &[
    "<dx>",
    "<pres>",
    "{known|k/c/o} <hx>, {now|today} <pres>",
    "<ref> {is|looks} {unwell|worse|not right}",
    "<ref> {with|has} <dx>",
    "{new|worsening} <pres>",
    "<pt> {with|adm} <dx>",
];
pub(super) const DP_MAIN: Bank = &[
    "<pt> adm with <dx>",
    "<dx>",
    "<pt>, <dx>, <day>",
    "<pt> {admitted|adm} {2/7|3 days|a week|4/7} ago with <dx>",
    "<pt> post <op>",
    "{Adm|admitted} {with|for} <dx> - {resolved|treated|improving}",
    "<pt> {recovering|recovered} from <dx>",
];

/// Negations that name only "a bed" or admission, for the notes where that word is the only
/// resource noun and the ask is for something else ("not a bed question, needs the reg").
pub(super) const NEG_BED: Bank = &[
    "not asking for a bed {yet|at this stage|right now|}",
    "not a bed {issue|problem|question} {really|}",
    "{doesn't|does not} need a bed {as such|yet|}",
    "{bed|admission} {not the issue|not the question} {here|}",
    "{no|not for a} bed {yet|for now|at present}",
    "{isn't|not} {after|looking for} a bed",
    "{won't|will not} need a bed {if this works|tonight|}",
    "{stays|staying} in {the same bed|this bed|<loc>} {for now|}",
];

/// A bed number or bay as where the patient lies, in notes that ask for something else.
pub(super) const MENTION_BED_LOCATION: Bank = &[
    "bed <n>",
    "<ward> bed <n>",
    "{in|on} bed <n> {on <ward>|}",
    "{pt|lady|man|patient} in bed <n>",
    "bay <n> bed <n>",
    "{the|our} {pt|patient} in bed <n>",
    "{side room|SR} <n> on <ward>",
    "bed <n> {again|-}",
];

/// A device already running or fitted: present, so not asked for.
pub(super) const MENTION_IN_PLACE: Bank = &[
    "{already on|on} <r> {since <time>|overnight|from ED|}",
    "<r> {in situ|running|up and running|in place|already set up} {since <time>|from earlier|}",
    "{has|has got} <ar> {already|on the ward|at the bedside}",
    "<r> {working fine|no issues} {overnight|today|}",
];

/// A slot already booked or done: present, so not asked for.
pub(super) const MENTION_BOOKED: Bank = &[
    "<r> {already booked|booked} for {tomorrow|the morning|Monday|this afternoon}",
    "<r> {already done|done} {- awaiting report|, report pending|<dur> ago}",
    "{has had|had} <r> {yesterday|overnight|in ED}",
];

/// Sentences of a clinical story that name no resource: what makes a long note long.
pub(super) const STORY: Bank = &[
    "{was|had been} {well until|fine until} {<dur> ago|last night|the weekend}",
    "{lives alone|lives with {wife|husband|daughter}|lives in a care home}{,| -} {independent|mobile with a stick|needs help with washing}",
    "{no|nil} {recent travel|sick contacts|recent abx}",
    "{takes|on} <drug> {at home|regularly|}",
    "{saw|seen by} {GP|the practice nurse} {<dur> ago|last week} {- abx given|- no better|}",
    "{eating|drinking} {less|poorly} {for <dur>|since Friday|}",
    "{bloods|VBG} {sent|taken} {at <time>|on arrival}",
    "{analgesia|paracetamol|oramorph} given {at <time>|with some effect|}",
    "{family|NOK|<parent>} {aware|updated|at bedside}",
    "{obs|NEWS2|PEWS} {rechecked|repeated} {at <time>|- no change}",
    "{on arrival|at handover} {alert|drowsy but rousable|comfortable at rest}",
    "{catheterised|cannulated} {in ED|on arrival|earlier}",
];

/// What a note goes on to say after its ask: later steps that ask for nothing.
pub(super) const TAIL: Bank = &[
    "{family|NOK|<parent>} updated {by phone|at bedside|}",
    "{repeat|recheck} obs in {1h|30 mins|4h}",
    "{keep|continue} NBM {for now|until seen|}",
    "will reassess {after|in} {an hour|the morning|the next obs}",
    "{fluid balance|FB chart|stool chart} {started|to continue}",
    "{safety-netted|safety netting given|aware of plan}",
    "{bloods|U&E|VBG} in {the morning|6h|am}",
    "{will|we'll} {hand over|update} {to nights|at handover|the day team}",
    "{thanks|thank you} {in advance|}",
];

/// Numbered plan lines around the ask: "Plan: 1) ... 2) <ask> 3) ...".
pub(super) const PLAN_LIST: Bank = &["Plan:", "Plan -", "Imp/plan:", "To do:", "Jobs:", "P:"];

/// Asks that end in where the patient is ("ECG pls bed 4", "frame for bay 2").
pub(super) const ASK_AT_PLACE: Bank =
    &["<r> {pls|please|} <loc>", "<r> for <loc> {pls|please|}", "<loc>{:| -} <r> {pls|please|needed}", "<r> to <loc> {pls|asap|}"];
