"""A small English corpus, written for afs, that the demo tokenizer is trained on (about 13 KB).

Plain prose, dialogue, lists, numbers and a little code, so that the demo vocabulary has the usual
mix of whole words, prefixes, punctuation runs and digit groups.
"""

DEMO_CORPUS = """\
The Lighthouse Keeper

On the northern edge of the island there stood a lighthouse, and in the lighthouse lived a keeper
named Ada. Every evening she climbed the one hundred and twelve steps to the lamp room, trimmed the
wick, polished the great glass lens and watched the light sweep across the water. Ships passed in the
night without ever seeing her, but they saw the light, and the light was enough.

Ada kept a logbook. In it she wrote the weather, the wind, the height of the tide and the names of
the ships she could read through her telescope. "Wind from the west, strong," she wrote one night.
"Rain after midnight. The fishing boats came home early. The Morning Star passed at 11:40 heading
south." She did not know where the ships were going, and she did not need to know. Her work was to
keep the light burning, and she had never once let it go out.

One winter the supply boat was late. A storm had closed the harbour on the mainland, and for three
weeks no one came. Ada counted her candles, her oil and her flour. She had enough oil for the lamp,
she decided, if she used less for herself. So she cooked on the small stove, read by the window in
the daytime, and went to bed early. When the boat finally arrived, the captain shook her hand and
said, "We saw your light every night. We knew you were still here."

Notes on Building Things

When you build something that other people will use, it helps to write down why you made each
choice. A design that seems obvious today will look strange in a year, and the person reading it may
be you. Good notes are short. They say what the thing is for, what it does not do, and what you tried
that did not work.

Start with the simplest version that could possibly be correct. Measure it. Then make it faster only
where the measurements tell you it is slow. Many programs spend most of their time in a few small
loops, and the rest of the code hardly matters for speed. It matters a great deal for clarity, though,
because someone will have to change it.

Tests are a kind of note, too. A test says: this is what we expect, and here is the proof that we
still get it. The best tests compare against an independent reference. If you compare your code only
with itself, you will find that it always agrees.

A Conversation at the Market

"Good morning! How much are the apples today?"
"Two dollars a pound, or five dollars for three pounds."
"And the pears?"
"The pears are a little more expensive this week. Three dollars a pound. The frost came early and
the harvest was small."
"I'll take three pounds of apples, then, and one pear to try."
"Here you are. That's six dollars altogether. Would you like a bag?"
"Yes, please. Thank you!"
"Thank you, and have a nice day. Come back on Saturday; we'll have fresh bread."

Questions and Answers

What is a tokenizer? A tokenizer turns text into a sequence of numbers that a language model can
read. Each number stands for a piece of text called a token. Common words are usually one token;
rare words are split into several smaller pieces.

Why not use one token per character? Because sequences would be very long, and the model would need
to learn spelling before it could learn meaning. Why not one token per word? Because there are too
many words, and new ones appear every day. Byte pair encoding is a compromise: it starts from single
bytes and repeatedly merges the most frequent pair into a new token.

What happens to a word the tokenizer has never seen? It is broken into smaller pieces that it has
seen, and in the worst case into single bytes. Nothing is ever lost, which is why a byte-level
tokenizer can read any text at all: English, numbers, code, or emoji.

How many tokens does a typical sentence use? For ordinary English, a token is about four characters,
or three quarters of a word. A page of text is roughly five hundred tokens.

The Garden in Spring

In March the garden is mostly mud. By April the first green shoots appear, and the gardener begins
to hope. She plants peas along the fence, lettuce in the shade of the old apple tree, and tomatoes in
pots by the south wall where they can catch the afternoon sun. Every morning she walks the rows with a
cup of tea, looking for slugs and counting the new leaves.

In May the garden wakes up properly. Bees arrive at the blossom, the beans climb their poles, and
the weeds grow faster than anything else. There is always more work than time. Still, on a warm
evening, sitting on the bench with the smell of cut grass in the air, she thinks it is all worth it.

Numbers and Dates

The meeting is on Tuesday, 14 March 2023, at 9:30 in room 204. Please bring the report from last
quarter. Sales rose by 12.5 percent, from 1,840 units to 2,070 units, while costs fell by 3 percent.
The budget for next year is $250,000, of which $40,000 is set aside for training.

The train leaves at 07:15 and arrives at 10:48, a journey of 3 hours and 33 minutes. Tickets cost
45 euros one way or 80 euros return. The express service, which runs twice a day, takes 2 hours and 5
minutes and costs 65 euros.

Recipe: Simple Bread

Ingredients: 500 g flour, 10 g salt, 7 g dried yeast, 350 ml warm water, 1 tablespoon olive oil.

1. Mix the flour, salt and yeast in a large bowl.
2. Add the water and the oil, and stir until a rough dough forms.
3. Knead for ten minutes on a floured table, until the dough is smooth and springy.
4. Cover and leave to rise for one hour, or until it has doubled in size.
5. Shape into a loaf, place on a tray, and let it rise for another 30 minutes.
6. Bake at 220 degrees for 30 to 35 minutes. The loaf is done when it sounds hollow underneath.

Let it cool before you cut it. This is the hardest step.

A Short Program

def count_words(text):
    counts = {}
    for word in text.split():
        word = word.strip(".,!?").lower()
        if word:
            counts[word] = counts.get(word, 0) + 1
    return counts

if __name__ == "__main__":
    sample = "the cat sat on the mat; the dog sat on the log"
    for word, n in sorted(count_words(sample).items()):
        print(f"{word}: {n}")

int add(int a, int b) { return a + b; }
for (int i = 0; i < n; ++i) { total += values[i]; }

Letters

Dear Sam,

Thank you for your letter, which arrived yesterday. I was glad to hear that the new job is going
well and that you have found a flat near the river. It sounds lovely. We are all well here. Your
brother has started school and talks about nothing but dinosaurs. The cat caught a mouse last week
and was very proud of herself.

I will visit in June if the trains are running. Let me know which weekend suits you best.

With love,
Mum

Dear Mum,

The second weekend of June would be perfect. I'll meet you at the station. Bring an umbrella; it
has rained every day this month!

Love,
Sam

Weather Report

Today will be cloudy at first, with sunny spells developing in the afternoon. Highs of 18 degrees.
Tonight, clear skies and a light breeze from the north; lows of 7 degrees. Tomorrow, rain spreading
from the west during the morning, heavy at times, clearing by evening. Winds strong near the coast.
The outlook for the weekend is mostly dry and a little warmer.

The River

The river begins as a spring high in the hills, no wider than a hand. It runs over stones and under
roots, gathering other streams as it goes, until by the time it reaches the town it is wide enough
for boats. People have lived beside it for thousands of years. They have fished in it, washed in it,
built mills on it and, now and then, been flooded by it. The river does not care. It keeps going,
always downhill, always toward the sea.

Children play on its banks in summer. They skip flat stones across the surface and count the
bounces: three, four, sometimes seven. In autumn the leaves float past like small boats, and in
winter, in the coldest years, the edges freeze and the ducks walk on the ice.

Rules of the Library

Please return books within three weeks. You may renew a book twice, unless another reader has
reserved it. Keep your voice low in the reading room. Food and drinks are not allowed, except water
in a closed bottle. The library opens at nine o'clock and closes at eight o'clock on weekdays, and at
five o'clock on Saturdays. It is closed on Sundays and public holidays.

Frequently, readers ask whether they can borrow newspapers. They can't; newspapers must be read in
the library. Magazines older than one month, however, can be borrowed for one week.

Short Sentences

It's late. We're tired. They've gone home. I'm sure she'd agree. You'll see. He's right, isn't he?
Don't worry; it doesn't matter. We couldn't find it, so we didn't buy it. Wouldn't you rather stay?
What's the time? Where's the station? Who's there? How's your mother? That's all, folks!

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.

On Learning

Nobody learns to play the piano by reading about it. You sit down, you play badly, and you play
again. Slowly your hands learn what your mind already knows. The same is true of writing, of cooking,
of programming and of almost everything worth doing. Reading helps, and teachers help more, but in
the end there is no substitute for practice.

The trick is to practise the hard parts. It is pleasant to play the pieces you already know, and it
feels like progress, but it is not. Find the bar that trips you up, play it slowly ten times, and then
play it a little faster. Tomorrow it will be easier. In a month you will wonder why it was ever hard.

Travel Journal

Day 1. Arrived late in the evening after a long flight. The hotel is small and quiet, with a view of
the harbour. Dinner was fish soup and bread, and a glass of local wine.

Day 2. Walked along the old city walls in the morning. In the afternoon we took a boat to the
island, swam in the clear water and ate lunch under a pine tree. Sunburnt, happy, exhausted.

Day 3. Rain! Spent the day in the museum, which was better than expected: ancient coins, maps, and
a model of the city as it was five hundred years ago. In the evening the sky cleared and the whole
town came out to walk by the sea.

Day 4. Early bus into the mountains. The road climbs in long curves through olive groves and then
pine forest. At the top there is a monastery and a cafe that serves the best lemon cake I have ever
eaten. We walked down through the forest, following a path marked with red paint on the rocks.

Day 5. Last day. Bought presents, sent postcards, packed. I would like to come back.

The Workshop

Grandfather's workshop smelled of sawdust, linseed oil and pipe tobacco. Chisels hung in a neat
row above the bench, each in its own leather loop, sharpened so keenly that he shaved the hair on his
forearm to prove it. He built chairs, mostly: ladder-backs of ash with woven rush seats, sturdy enough
for a century of suppers. He never used a screw when a wooden peg would do, and he never hurried.
"Measure twice," he muttered, "cut once, and then sweep the floor." Visitors admired the furniture;
he admired the trees. Oak, walnut, cherry, sycamore, beech and elm each behaved differently under the
plane, and he could identify most of them blindfolded, by scent alone.

Astronomy for Beginners

On a clear, moonless night, far from streetlights, roughly two thousand stars are visible to the
naked eye. Binoculars reveal many thousands more, together with craters on the Moon, the four bright
satellites of Jupiter and the crescent phases of Venus. Planets wander slowly against the constellations,
which is why ancient observers called them wanderers. Comets appear unpredictably, glowing faintly
with long, delicate tails that always point away from the Sun. Meteors, by contrast, are tiny grains
of dust burning up high in the atmosphere; during showers such as the Perseids in August, patient
watchers may count dozens per hour. Telescopes gather light, magnify detail and, above all, encourage
curiosity about galaxies, nebulae, clusters and the enormous distances between them.

Kitchen Chemistry

Why does bread rise? Yeast consumes sugars and releases carbon dioxide, which gluten traps in
elastic bubbles. Why does a cut apple turn brown? Enzymes react with oxygen, and lemon juice slows the
reaction because acidity inhibits them. Why do onions make us cry? Slicing ruptures cells, releasing
volatile sulfur compounds that irritate our eyes. Caramelisation, emulsification, fermentation and
gelatinisation sound intimidating, yet every cook practises them daily, usually without naming them.

Maintenance Checklist

- Inspect filters monthly; replace whenever visibly clogged.
- Lubricate hinges, bearings and pulleys quarterly.
- Verify backups weekly, and practise restoring them, because untested backups are merely hopes.
- Record firmware versions, serial numbers, warranty expiry dates and supplier contacts.
- Label cables at both ends. Future technicians, including yourself, will be grateful.
"""
